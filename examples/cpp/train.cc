// A libtorch training loop across sites with strait's C++ API: the same
// engine, wire format and results as a Python site (strait package), so a
// libtorch site and a Python site train one model together
// (tests/python/test_interop.py runs exactly that).
//
//   build/examples/cpp/strait_example_cpp CONFIG SITE [--steps N] [--out FILE]
//
// The config's sync.mode decides: every_step averages the gradients across
// sites each step (as the DDP hook does in Python: one bucket in DDP's
// order), diloco runs DiLoCo with the config's sync.diloco settings. Each
// site classifies its own synthetic data, computed in the process: it
// never leaves it. examples/cpp/README.md shows two sites on one machine.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/config/config.h"
#include "torch_ext/strait_torch.h"

namespace {

// The model of tests/python/interop_worker.py, initialised by the same
// formula (so every-step sites start from the same parameters).
struct Net : torch::nn::Module {
  Net() : fc1(register_module("0", torch::nn::Linear(16, 32))), fc2(register_module("2", torch::nn::Linear(32, 4))) {
    torch::NoGradGuard no_grad;
    int k = 0;
    for (auto& p : parameters()) {
      p.copy_((torch::sin(torch::arange(p.numel(), torch::kFloat32) * 0.37 + k) * 0.2).view(p.sizes()));
      ++k;
    }
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};

// This site's data: 256 points whose class is the largest of their first
// four features.
std::pair<torch::Tensor, torch::Tensor> siteData(int64_t site) {
  const torch::Tensor i = torch::arange(256, torch::kFloat32).view({256, 1});
  const torch::Tensor j = torch::arange(16, torch::kFloat32).view({1, 16});
  const torch::Tensor x = torch::sin(i * 0.13 + j * 0.71 + double(site) * 0.5);
  return {x, x.narrow(1, 0, 4).argmax(1)};
}

std::string hashOf(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> flat;
  for (const auto& p : params) flat.push_back(p.detach().reshape({-1}));
  const torch::Tensor all = torch::cat(flat).contiguous();
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the bytes
  const auto* b = static_cast<const uint8_t*>(all.data_ptr());
  for (int64_t k = 0; k < all.nbytes(); ++k) h = (h ^ b[k]) * 1099511628211ull;
  char text[24];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CONFIG SITE [--steps N] [--out FILE]\n", argv[0]);
    return 2;
  }
  int steps = 60;
  std::string out;
  for (int a = 3; a + 1 < argc; a += 2) {
    if (!std::strcmp(argv[a], "--steps")) steps = std::atoi(argv[a + 1]);
    if (!std::strcmp(argv[a], "--out")) out = argv[a + 1];
  }
  try {
    torch::set_num_threads(1);
    auto session = c10::make_intrusive<strait::torch::Session>(strait::torch::SessionOptions{argv[1], argv[2]});
    const bool diloco_mode = strait::core::JobConfig::load(argv[1]).mode == strait::core::SyncMode::kDiLoCo;
    const auto [x, y] = siteData(session->siteIndex());
    auto model = std::make_shared<Net>();
    std::vector<std::string> names;
    std::vector<torch::Tensor> params;
    for (const auto& kv : model->named_parameters()) {
      names.push_back(kv.key());
      params.push_back(kv.value());
    }
    torch::optim::SGD opt(params, torch::optim::SGDOptions(diloco_mode ? 0.2 : 0.5));
    std::unique_ptr<strait::torch::DiLoCo> diloco;
    std::unique_ptr<strait::torch::EveryStep> every;
    if (diloco_mode) {
      diloco = std::make_unique<strait::torch::DiLoCo>(session, names, params);
    } else {
      every = std::make_unique<strait::torch::EveryStep>(session);
    }
    double loss = 0;
    for (int step = 1; step <= steps; ++step) {
      opt.zero_grad();
      torch::Tensor l = torch::nn::functional::cross_entropy(model->forward(x), y);
      l.backward();
      if (every) {
        // One bucket laid out as a Python site's DDP lays it out: the
        // parameters' order in the first step, then the order their
        // gradients became ready (DDP rebuilds its buckets after the first
        // iteration): here the reverse. The layout is part of what sites
        // agree on (checked once per layout).
        std::vector<torch::Tensor> order = params, grads;
        if (step > 1) std::reverse(order.begin(), order.end());
        for (const auto& p : order) grads.push_back(p.grad());
        every->average(grads, order);
      }
      opt.step();
      if (diloco) diloco->step();
      loss = l.item<double>();
      session->log(step, loss);
    }
    if (diloco) diloco->flush();
    std::printf("site %s: %d steps, loss %.5f, parameters %s\n", session->site().c_str(), steps, loss,
                hashOf(params).c_str());
    if (!out.empty()) {
      std::ofstream(out) << "{\"site\": \"" << session->site() << "\", \"hash\": \"" << hashOf(params)
                         << "\", \"loss\": " << loss << ", \"payload_bytes_sent\": " << session->bytesSent()
                         << ", \"syncs\": " << (diloco ? diloco->syncs() : 0) << "}\n";
    }
    diloco.reset();
    every.reset();
    session->close();
  } catch (const strait::Error& e) {
    std::fprintf(stderr, "strait: %s\n", e.what());
    return 1;
  }
  return 0;
}
