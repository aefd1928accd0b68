// The libtorch C++ API: two sites (threads, real gateways on loopback)
// average tensors and run DiLoCo; results are bitwise identical everywhere.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <future>
#include <thread>
#include <utility>

#include "core/error.h"
#include "tests/cpp/transport/transport_test_util.h"
#include "torch_ext/csrc/device_codecs.h"
#include "torch_ext/strait_torch.h"

namespace strait::torch {
namespace {

std::string writeConfig(const std::string& pipeline, double w0 = 1.0, double w1 = 1.0,
                        const std::string& mode = "every_step") {
  char tmpl[] = "/tmp/strait-api-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string path = dir + "/job.yaml";
  std::ofstream(path) << "job: {id: api-test}\n"
                      << "sites:\n"
                      << "  - {name: a, jurisdiction: CN, endpoint: \"tcp://127.0.0.1:" << transport::testing::freePort()
                      << "\", weight: " << w0 << "}\n"
                      << "  - {name: b, jurisdiction: SG, endpoint: \"tcp://127.0.0.1:" << transport::testing::freePort()
                      << "\", weight: " << w1 << "}\n"
                      << "sync: {mode: " << mode << "}\n"
                      << "compression: {pipeline: \"" << pipeline << "\"}\n"
                      << "transport: {insecure: true, round_deadline_s: 30, hard_deadline_s: 60, heartbeat_ms: 50, "
                         "peer_timeout_ms: 2000}\n";
  return path;
}

using SessionPtr = c10::intrusive_ptr<Session>;

SessionPtr open(const std::string& config, const std::string& site) {
  SessionOptions o;
  o.config = config;
  o.site = site;
  o.log = false;
  return c10::make_intrusive<Session>(o);
}

// Runs fa on site a in this thread and fb on site b in another.
template <typename Fa, typename Fb>
void bothSites(const std::string& config, Fa fa, Fb fb) {
  auto other = std::async(std::launch::async, [&] {
    SessionPtr b = open(config, "b");
    fb(b);
    b->close();
  });
  SessionPtr a = open(config, "a");
  fa(a);
  a->close();
  ASSERT_EQ(other.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  other.get();
}

// The GPU's top-k selection is ATen ops on the tensor's device; on CPU
// tensors it must keep exactly the CPU encoder's indices, ties included.
TEST(DeviceTopK, SelectsTheCpuEncodersIndicesTiesIncluded) {
  ::torch::manual_seed(3);
  for (const char* text : {"topk(0.01)", "topk(count=3)", "topk(0.03, chunk=512)", "topk(0.5, chunk=100)",
                           "topk(0.2, chunk=5000)", "topk(1.0)", "topk(0.1, method=radix) -> int4"}) {
    const strait::core::Pipeline p = strait::core::Pipeline::parse(text);
    for (int64_t n : {1, 7, 1000, 4099, 70001}) {
      for (bool ties : {false, true}) {
        at::Tensor x = ::torch::randn({n});
        if (ties) x = (x * 4).round() / 4;  // many equal magnitudes, zeros among them
        strait::core::CodecState st(9);
        std::vector<uint8_t> payload;
        p.encode(x.data_ptr<float>(), size_t(n), st, payload);
        const auto cpu = strait::core::planDeviceDecode(payload.data(), payload.size(), size_t(n));
        ASSERT_TRUE(cpu.has_value());
        strait::core::CodecState st2(9);
        const auto plan = p.planDeviceTopK(size_t(n), st2);
        ASSERT_TRUE(plan.has_value());
        EXPECT_EQ(st2.encodeCount(), st.encodeCount()) << "the plan draws the encoder's seed";
        const at::Tensor got = strait::torch::selectTopK(x, *plan);
        ASSERT_EQ(got.numel(), int64_t(cpu->indices.size())) << text << " n=" << n;
        const std::vector<uint32_t> want = cpu->indices;
        const at::Tensor expect = ::torch::from_blob(const_cast<uint32_t*>(want.data()), {int64_t(want.size())},
                                                   ::torch::kInt).to(::torch::kLong);
        EXPECT_TRUE(::torch::equal(got, expect)) << text << " n=" << n << " ties=" << ties;
        // The head the device path writes is the CPU payload's up to the values.
        std::vector<uint8_t> head = plan->header;
        p.appendTopKHead(*plan, want, head);
        ASSERT_LE(head.size(), payload.size());
        EXPECT_TRUE(std::equal(head.begin(), head.end(), payload.begin())) << text << " n=" << n;
        EXPECT_EQ(cpu->body_offset, head.size());
      }
    }
  }
}

TEST(TorchApi, AveragesAcrossSitesWithWeightsInSiteOrder) {
  const std::string config = writeConfig("fp32", 1.0, 3.0);
  const at::Tensor x = at::randn({4, 5}), y = at::randn({7});
  const at::Tensor u = at::randn({4, 5}), v = at::randn({7});
  std::vector<at::Tensor> ta = {x.clone(), y.clone()}, tb = {u.clone(), v.clone()};
  bothSites(
      config, [&](SessionPtr& s) { EveryStep(s).average(ta); }, [&](SessionPtr& s) { EveryStep(s).average(tb); });
  // acc = 0 + 0.25 * a, then += 0.75 * b: the same float ops as below.
  const at::Tensor ex = x * 0.25f + u * 0.75f, ey = y * 0.25f + v * 0.75f;
  EXPECT_TRUE(at::equal(ta[0], ex));
  EXPECT_TRUE(at::equal(ta[1], ey));
  EXPECT_TRUE(at::equal(tb[0], ta[0])) << "both sites hold the same bits";
  EXPECT_TRUE(at::equal(tb[1], ta[1]));
}

TEST(TorchApi, CompressedAveragesAreIdenticalOnBothSites) {
  const std::string config = writeConfig("topk(0.2) -> int8");
  std::vector<at::Tensor> ta = {at::randn({1000})}, tb = {at::randn({1000})};
  bothSites(
      config,
      [&](SessionPtr& s) {
        EveryStep e(s);
        for (int i = 0; i < 3; ++i) e.average(ta);
      },
      [&](SessionPtr& s) {
        EveryStep e(s);
        for (int i = 0; i < 3; ++i) e.average(tb);
      });
  EXPECT_TRUE(at::equal(ta[0], tb[0]));
}

TEST(TorchApi, DifferentShapesAreAClearError) {
  const std::string config = writeConfig("fp32");
  std::vector<at::Tensor> ta = {at::randn({3})}, tb = {at::randn({4})};
  std::string ea, eb;
  auto attempt = [](std::vector<at::Tensor>& t, std::string& error) {
    return [&](SessionPtr& s) {
      try {
        EveryStep(s).average(t);
      } catch (const InvalidArgument& e) {
        error = e.what();
      }
    };
  };
  bothSites(config, attempt(ta, ea), attempt(tb, eb));
  EXPECT_NE(ea.find("the model differs between sites: site 'b' has '(4,) Float' where site 'a' has '(3,) Float'"),
            std::string::npos)
      << ea;
  EXPECT_NE(eb.find("site 'a' has '(3,) Float'"), std::string::npos) << eb;
}

TEST(TorchApi, SitesStartingFromDifferentParametersAreToldSoInEveryStepMode) {
  const std::string config = writeConfig("fp32");
  std::vector<at::Tensor> ta = {at::ones({3})}, tb = {at::ones({3})};
  std::string ea, eb;
  auto attempt = [](std::vector<at::Tensor>& t, float start, std::string& error) {
    return [&t, start, &error](SessionPtr& s) {
      at::Tensor param = at::full({3}, start);
      try {
        EveryStep e(s);
        e.bucket(t[0], 0, {param}, true);
        e.finishStep();
      } catch (const InvalidArgument& x) {
        error = x.what();
      }
    };
  };
  bothSites(config, attempt(ta, 1.0f, ea), attempt(tb, 2.0f, eb));
  EXPECT_NE(ea.find("the sites start from different parameters (ddp.b0 digests: a "), std::string::npos) << ea;
  EXPECT_NE(eb.find("the sites start from different parameters"), std::string::npos) << eb;
}

TEST(TorchApi, TheConfigDecidesTheMode) {
  const std::string every = writeConfig("fp32");
  SessionPtr s = open(every, "a");
  at::Tensor w = at::zeros({2});
  try {
    DiLoCo(s, {"w"}, {w});
    FAIL() << "DiLoCo ran under sync.mode: every_step";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("says sync.mode: every_step; DiLoCo runs only under sync.mode: diloco"),
              std::string::npos)
        << e.what();
  }
  s->close();
  const std::string diloco = writeConfig("fp32", 1, 1, "diloco");
  SessionPtr d = open(diloco, "a");
  EXPECT_THROW(EveryStep{d}, InvalidArgument);
  d->close();
}

// `steps` inner steps of fitting y = 3x + 1 on site `which`'s half of
// [-1, 1], each followed by diloco.step(); returns the first and last losses.
template <typename Model>
std::pair<float, float> fitLine(Model& model, ::torch::optim::Optimizer& opt, DiLoCo& diloco, int which, int steps) {
  const at::Tensor x = at::linspace(which == 0 ? -1.0 : 0.0, which == 0 ? 0.0 : 1.0, 64).view({64, 1});
  const at::Tensor y = 3 * x + 1;
  float first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    auto loss = ::torch::mse_loss(model->forward(x), y);
    loss.backward();
    opt.step();
    diloco.step();
    (step == 0 ? first : last) = loss.template item<float>();
  }
  return {first, last};
}

std::vector<std::string> namesOf(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back("p" + std::to_string(i));
  return out;
}

DiLoCoOptions options(int64_t sync_every, int64_t fragments = 1, bool overlap = false) {
  DiLoCoOptions o;
  o.sync_every = sync_every;
  o.outer_lr = 0.8;
  o.outer_momentum = 0.5;
  o.nesterov = true;
  o.fragments = fragments;
  o.overlap = overlap;
  return o;
}

// Each site fits the line on its own half of the data; DiLoCo keeps the two
// replicas identical after every sync and the shared model finds the line.
void trainSite(SessionPtr& site, int which, at::Tensor& weight_out, at::Tensor& bias_out) {
  ::torch::manual_seed(100 + which);  // different local inits: DiLoCo adopts site 0's
  ::torch::nn::Linear model(1, 1);
  ::torch::optim::SGD opt(model->parameters(), 0.1);
  DiLoCo diloco(site, namesOf(2), model->parameters(), options(5));
  fitLine(model, opt, diloco, which, 100);
  EXPECT_EQ(diloco.syncs(), 20);
  weight_out = model->weight.detach().clone();
  bias_out = model->bias.detach().clone();
}

TEST(TorchApi, DiLoCoKeepsReplicasIdenticalAndLearns) {
  const std::string config = writeConfig("int8(rounding=stochastic)", 1, 1, "diloco");
  at::Tensor wa, ba, wb, bb;
  bothSites(
      config, [&](SessionPtr& s) { trainSite(s, 0, wa, ba); }, [&](SessionPtr& s) { trainSite(s, 1, wb, bb); });
  EXPECT_TRUE(at::equal(wa, wb));
  EXPECT_TRUE(at::equal(ba, bb));
  EXPECT_NEAR(wa.item<float>(), 3.0f, 0.3f);
  EXPECT_NEAR(ba.item<float>(), 1.0f, 0.3f);
}

// Runs train(site, which, tensors out) at both sites of the job in `config`:
// each must end with `count` tensors, bitwise the same at both.
using TrainSite = std::function<void(SessionPtr&, int, std::vector<at::Tensor>&)>;
void expectIdenticalReplicas(const std::string& config, size_t count, const TrainSite& train) {
  std::vector<at::Tensor> a, b;
  bothSites(
      config, [&](SessionPtr& s) { train(s, 0, a); }, [&](SessionPtr& s) { train(s, 1, b); });
  ASSERT_EQ(a.size(), count);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "tensor " << i;
}

// Streaming (and overlapped): a two-layer model (four tensors) in two
// fragments, one synced every 5 steps in turn; after flush() both sites
// hold the same bits.
class Streaming : public ::testing::TestWithParam<bool> {};

TEST_P(Streaming, SyncsOneFragmentAtATimeAndKeepsReplicasIdentical) {
  const bool overlap = GetParam();
  const std::string config = writeConfig("int8(rounding=stochastic)", 1, 1, "diloco");
  auto train = [overlap](SessionPtr& site, int which, std::vector<at::Tensor>& out) {
    ::torch::manual_seed(200 + which);
    ::torch::nn::Sequential model(::torch::nn::Linear(1, 8), ::torch::nn::Tanh(), ::torch::nn::Linear(8, 1));
    ::torch::optim::SGD opt(model->parameters(), 0.05);
    EXPECT_THROW(DiLoCo(site, namesOf(4), model->parameters(), options(10, 3)), InvalidArgument);  // 10 % 3
    EXPECT_THROW(DiLoCo(site, namesOf(4), model->parameters(), options(10, 5)), InvalidArgument);  // 4 tensors
    DiLoCo diloco(site, namesOf(4), model->parameters(), options(10, 2, overlap));
    // Tensors of 8, 8, 8 and 1 values: {0, 2} and {1, 3} (16 and 9 values).
    EXPECT_EQ(diloco.fragments(), (std::vector<std::vector<int64_t>>{{0, 2}, {1, 3}}));
    const auto [first, last] = fitLine(model, opt, diloco, which, 200);
    EXPECT_EQ(diloco.syncs(), overlap ? 39 : 40);  // every 5 steps; with overlap the last is in flight
    EXPECT_LT(last, 0.2f * first);
    diloco.flush();
    EXPECT_EQ(diloco.syncs(), 40);
    for (const at::Tensor& p : model->parameters()) out.push_back(p.detach().clone());
  };
  expectIdenticalReplicas(config, 4, train);
}

INSTANTIATE_TEST_SUITE_P(Modes, Streaming, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "overlap" : "plain"; });

// SparseLoCo from the libtorch API (DiLoCoOptions::sparseloco) under a plain
// DiLoCo config: chunk-wise top-k at 2 bits with an error-feedback buffer in
// place of outer momentum; outer momentum alongside it is an error.
TEST(TorchApi, SparseLoCoKeepsReplicasIdenticalAndLearns) {
  const std::string config = writeConfig("int8", 1, 1, "diloco");
  auto train = [](SessionPtr& site, int which, std::vector<at::Tensor>& out) {
    ::torch::manual_seed(300 + which);
    ::torch::nn::Sequential model(::torch::nn::Linear(1, 8), ::torch::nn::Tanh(), ::torch::nn::Linear(8, 1));
    ::torch::optim::SGD opt(model->parameters(), 0.05);
    DiLoCoOptions bad = options(5);
    bad.sparseloco = true;
    EXPECT_THROW(DiLoCo(site, namesOf(4), model->parameters(), bad), InvalidArgument);  // outer_momentum 0.5
    DiLoCoOptions o;
    o.sync_every = 5;
    o.sparseloco = true;
    DiLoCo diloco(site, namesOf(4), model->parameters(), o);
    EXPECT_EQ(diloco.sparseloco(), "topk(ratio=0.03125, chunk=4096) -> int2(block=256, rounding=nearest), decay 0.95");
    EXPECT_EQ(diloco.outerMomentum(), 0.0);
    EXPECT_EQ(diloco.outerLr(), 1.0);
    const auto [first, last] = fitLine(model, opt, diloco, which, 200);
    EXPECT_LT(last, 0.5f * first);
    diloco.flush();
    for (const at::Tensor& p : model->parameters()) out.push_back(p.detach().clone());
  };
  expectIdenticalReplicas(config, 4, train);
}

TEST(TorchApi, BadOptionsAndConfigsThrow) {
  EXPECT_THROW(open("/nonexistent/job.yaml", "a"), ConfigError);
  const std::string config = writeConfig("fp32");
  EXPECT_THROW(open(config, "tokyo"), ConfigError);
}

}  // namespace
}  // namespace strait::torch
