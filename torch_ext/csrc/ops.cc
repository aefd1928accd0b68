// torch.ops.strait: the compression library as PyTorch operators, and the
// stateful Compressor (error feedback, warm starts) and the site Gateway as
// torch custom classes.
//
// One TORCH_LIBRARY block holds every schema; the kernels are registered per
// dispatch key (CPU, CUDA) below it, and the fake (meta) kernels that let the
// operators trace under torch.compile live in Python (strait/_fake.py), with
// torch.library.register_fake. Kernels only adapt: check arguments, view the
// tensor as a flat float32 buffer, call core/. CUDA tensors are encoded and
// decoded on their GPU (device_codecs.h, implemented at the end of this
// file) where the build has the CUDA part; only the compressed payload
// crosses to host memory. Structures the device does not run (random-k,
// low-rank; top-k's encode) are staged through the CPU.
//
// Functions that take or give no tensors (config checks, a payload's header,
// how the library was built) are static methods of torch.classes.strait.Library,
// not operators: they have no place in a graph.

#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <climits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/codec/codec.h"
#include "core/codec/impl/lanes.h"
#include "core/config/config.h"
#include "core/digest.h"
#include "core/error.h"
#include "torch_ext/build_config.h"
#include "torch_ext/csrc/compressor.h"
#include "torch_ext/strait_torch.h"
#include "transport/gateway.h"

#include "torch_ext/csrc/device_codecs.h"

#if STRAIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch_ext/csrc/cuda/codecs.h"
#include "torch_ext/csrc/cuda/runtime.h"
#endif

namespace strait::torch_ext {

namespace {

// A contiguous float32 CPU copy (or view) of x, with a clear message for
// anything else.
at::Tensor floatCpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": expected a float32 tensor, got ", x.scalar_type(),
              " (convert with .float())");
  return x.to(at::kCPU).contiguous();
}

at::Tensor bytesCpu(const at::Tensor& payload, const char* op) {
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.dim() == 1, op,
              ": the payload must be a 1-D uint8 tensor (what strait.encode returns), got ",
              payload.scalar_type(), " with ", payload.dim(), " dimensions");
  return payload.to(at::kCPU).contiguous();
}

core::TensorShape shapeOf(const at::Tensor& x) {
  core::TensorShape s;
  for (int64_t d : x.sizes()) s.dims.push_back(d);
  return s;
}

at::Tensor toTensor(const std::vector<uint8_t>& bytes) {
  at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(out.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return out;
}

// Runs fn, turning strait's exceptions into c10 errors (RuntimeError in
// Python) that keep strait's message.
template <typename Fn>
auto translate(const char* op, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const strait::PolicyViolation& e) {
    // Python raises strait.PolicyViolation for these.
    TORCH_CHECK(false, op, ": policy violation: ", e.what());
  } catch (const strait::Error& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// The payload, a uint8 CPU tensor, whatever x's device.
at::Tensor encode(const at::Tensor& x, const std::string& pipeline, int64_t seed) {
  return translate("strait.encode", [&] {
    const core::Pipeline p = core::Pipeline::parse(pipeline);
    core::CodecState state(static_cast<uint64_t>(seed));
    std::vector<uint8_t> out;
    if (x.is_cuda() && strait::torch::deviceCodecs()) {
      TORCH_CHECK(x.scalar_type() == at::kFloat, "strait.encode: expected a float32 tensor, got ", x.scalar_type(),
                  " (convert with .float())");
      if (strait::torch::encodeOnDevice(x.contiguous(), p, state, out)) return toTensor(out);
    }
    const at::Tensor flat = floatCpu(x, "strait.encode");
    p.encode(flat.data_ptr<float>(), static_cast<size_t>(flat.numel()), shapeOf(x), state, out);
    return toTensor(out);
  });
}

// The decoded values, float32, on the payload's device.
at::Tensor decode(const at::Tensor& payload, at::IntArrayRef shape) {
  return translate("strait.decode", [&] {
    const at::Tensor bytes = bytesCpu(payload, "strait.decode");
    if (payload.is_cuda() && strait::torch::deviceCodecs()) {
      at::Tensor out = at::empty(shape, payload.options().dtype(at::kFloat));
      if (strait::torch::decodeOnDevice(bytes.data_ptr<uint8_t>(), static_cast<size_t>(bytes.numel()), out, 1.0f,
                                        false)) {
        return out;
      }
    }
    at::Tensor out = at::empty(shape, at::kFloat);
    core::decode(bytes.data_ptr<uint8_t>(), static_cast<size_t>(bytes.numel()), out.data_ptr<float>(),
                 static_cast<size_t>(out.numel()));
    return payload.device().is_cpu() ? out : out.to(payload.device());
  });
}

void decodeAccumulate(at::Tensor acc, const at::Tensor& payload, double weight) {
  translate("strait.decode_accumulate", [&] {
    TORCH_CHECK(acc.scalar_type() == at::kFloat, "strait.decode_accumulate: the accumulator must be float32, got ",
                acc.scalar_type());
    const at::Tensor bytes = bytesCpu(payload, "strait.decode_accumulate");
    // The CPU's bits on every device: on the GPU by the device codecs, or
    // the CPU's arithmetic on a copy (a torch add would fuse w * v + acc).
    at::Tensor target = acc.is_contiguous() ? acc : acc.contiguous();
    strait::torch::accumulateExact(bytes.data_ptr<uint8_t>(), static_cast<size_t>(bytes.numel()), target,
                                   static_cast<float>(weight));
    if (!target.is_same(acc)) acc.copy_(target);
  });
}

std::tuple<int64_t, std::string, std::string, int64_t> payloadInfo(const at::Tensor& payload) {
  return translate("strait.payload_info", [&] {
    const at::Tensor bytes = bytesCpu(payload, "strait.payload_info");
    const core::PayloadInfo i = core::inspectPayload(bytes.data_ptr<uint8_t>(), static_cast<size_t>(bytes.numel()));
    return std::make_tuple(static_cast<int64_t>(i.n), i.structure, i.values, static_cast<int64_t>(i.bits));
  });
}

void validateConfig(const std::string& path) {
  translate("strait.validate_config", [&] { core::JobConfig::load(path); });
}

// The site's position in the job's order; ConfigError naming the sites if
// the job has no such site.
int64_t siteIndex(const std::string& path, const std::string& site) {
  return translate("strait.init", [&] {
    const core::JobConfig config = core::JobConfig::load(path);
    const core::SiteConfig& s = config.site(site);
    return static_cast<int64_t>(&s - config.sites.data());
  });
}

// How this library was built, as "key=value" lines (strait.build_info()
// turns them into a dict).
std::string buildInfo() {
  std::string out = std::string("version=") + STRAIT_VERSION + "\ntorch=" + STRAIT_BUILT_WITH_TORCH;
#if STRAIT_WITH_CUDA
  // device_codecs: CUDA tensors are encoded and decoded on their GPU.
  out += std::string("\ncuda=1\ndevice_codecs=1\ncuda_archs=") + STRAIT_CUDA_ARCHS;
  out += "\ncuda_runtime=" + std::to_string(cuda::runtimeVersion());
  out += "\ncuda_devices=" + std::to_string(cuda::deviceCount());
#else
  out += "\ncuda=0";
#endif
  return out;
}

// The config's compression rule for a tensor: (canonical pipeline, error feedback).
std::tuple<std::string, bool> ruleFor(const std::string& path, const std::string& name, int64_t size) {
  return translate("strait.rule_for", [&] {
    const core::JobConfig config = core::JobConfig::load(path);
    const core::CompressionRule& r = config.compression.ruleFor(name, static_cast<uint64_t>(size));
    return std::make_tuple(r.pipeline.toString(), r.error_feedback);
  });
}

template <typename T>
using Self = c10::intrusive_ptr<T>;

std::vector<uint8_t> bytesOfTensor(const at::Tensor& t, const char* op) {
  const at::Tensor b = bytesCpu(t, op);
  return std::vector<uint8_t>(b.data_ptr<uint8_t>(), b.data_ptr<uint8_t>() + b.numel());
}

// The engine (strait_torch.h) as torch custom classes: Session, DiLoCo,
// EveryStep. Each method only converts and translates errors.
void registerEngine(::torch::Library& m) {
  using strait::torch::DiLoCo;
  using strait::torch::DiLoCoOptions;
  using strait::torch::EveryStep;
  using strait::torch::Session;
  using strait::torch::SessionOptions;
  m.class_<Session>("Session")
      .def(::torch::init([](const std::string& config, const std::string& site, const std::string& policy,
                            std::optional<c10::intrusive_ptr<c10d::ProcessGroup>> group, bool resume, bool log,
                            const std::string& json_log) {
        return translate("strait.init", [&] {
          SessionOptions o{config, site, policy, group.value_or(nullptr), resume, log, json_log};
          return c10::make_intrusive<Session>(std::move(o));
        });
      }))
      .def("site", [](const Self<Session>& s) { return s->site(); })
      .def("site_index", [](const Self<Session>& s) { return s->siteIndex(); })
      .def("sites", [](const Self<Session>& s) { return s->sites(); })
      .def("rank", [](const Self<Session>& s) { return s->rank(); })
      .def("size", [](const Self<Session>& s) { return s->size(); })
      .def("job_rank", [](const Self<Session>& s) { return s->jobRank(); })
      .def("job_size", [](const Self<Session>& s) { return s->jobSize(); })
      .def("leader", [](const Self<Session>& s) { return s->leader(); })
      .def("resuming", [](const Self<Session>& s) { return s->resuming(); })
      .def("log",
           [](const Self<Session>& s, int64_t step, std::optional<double> loss, const std::string& fields) {
             return translate("strait.Session.log", [&] { return s->log(step, loss, fields); });
           })
      .def("event", [](const Self<Session>& s, const std::string& message) { s->event(message); })
      .def("bytes_sent", [](const Self<Session>& s) { return static_cast<int64_t>(s->bytesSent()); })
      .def("last_missing", [](const Self<Session>& s) { return s->lastMissing(); })
      .def("audit_head", [](const Self<Session>& s) { return s->auditHead(); })
      .def("audit_records", [](const Self<Session>& s) { return s->auditRecords(); })
      .def("privacy_spent", [](const Self<Session>& s) { return s->privacySpent(); })
      .def("close", [](const Self<Session>& s) { translate("strait.Session.close", [&] { s->close(); }); });

  m.class_<DiLoCo>("DiLoCo")
      .def(::torch::init([](const Self<Session>& session, std::vector<std::string> names,
                            std::vector<at::Tensor> params, std::optional<int64_t> sync_every,
                            std::optional<double> outer_lr, std::optional<double> outer_momentum,
                            std::optional<bool> nesterov, std::optional<int64_t> fragments,
                            std::optional<bool> overlap, const std::string& pipeline,
                            std::optional<bool> sparseloco) {
        return translate("strait.DiLoCo", [&] {
          DiLoCoOptions o{sync_every, outer_lr, outer_momentum, nesterov, fragments, overlap, pipeline, sparseloco};
          return c10::make_intrusive<DiLoCo>(session, std::move(names), std::move(params), std::move(o));
        });
      }))
      .def("step", [](const Self<DiLoCo>& d) { return translate("strait.DiLoCo.step", [&] { return d->step(); }); })
      .def("flush", [](const Self<DiLoCo>& d) { translate("strait.DiLoCo.flush", [&] { d->flush(); }); })
      .def("write_checkpoint",
           [](const Self<DiLoCo>& d, const at::Tensor& extra) {
             translate("strait.DiLoCo.write_checkpoint",
                       [&] { d->writeCheckpoint(bytesOfTensor(extra, "strait.DiLoCo.write_checkpoint")); });
           })
      .def("write_failure_checkpoint",
           [](const Self<DiLoCo>& d, const at::Tensor& extra) {
             translate("strait.DiLoCo.write_failure_checkpoint",
                       [&] { d->writeFailureCheckpoint(bytesOfTensor(extra, "strait.DiLoCo.write_checkpoint")); });
           })
      .def("resumed_extra", [](const Self<DiLoCo>& d) { return toTensor(d->resumedExtra()); })
      .def("resumed", [](const Self<DiLoCo>& d) { return d->resumed(); })
      .def("syncs", [](const Self<DiLoCo>& d) { return d->syncs(); })
      .def("local_steps", [](const Self<DiLoCo>& d) { return d->localSteps(); })
      .def("sync_every", [](const Self<DiLoCo>& d) { return d->syncEvery(); })
      .def("outer_lr", [](const Self<DiLoCo>& d) { return d->outerLr(); })
      .def("outer_momentum", [](const Self<DiLoCo>& d) { return d->outerMomentum(); })
      .def("nesterov", [](const Self<DiLoCo>& d) { return d->nesterov(); })
      .def("sparseloco", [](const Self<DiLoCo>& d) { return d->sparseloco(); })
      .def("overlap", [](const Self<DiLoCo>& d) { return d->overlap(); })
      .def("fragments", [](const Self<DiLoCo>& d) { return d->fragments(); })
      .def("global_params", [](const Self<DiLoCo>& d) { return d->globalParams(); })
      .def("unflushed", [](const Self<DiLoCo>& d) { return d->unflushed(); });

  m.class_<EveryStep>("EveryStep")
      .def(::torch::init([](const Self<Session>& session) {
        return translate("strait.ddp_hook", [&] { return c10::make_intrusive<EveryStep>(session); });
      }))
      .def("bucket",
           [](const Self<EveryStep>& e, const at::Tensor& buffer, int64_t index, std::vector<at::Tensor> params,
              bool last) -> c10::IValue {
             return translate("strait.ddp_hook", [&] { return c10::IValue(e->bucket(buffer, index, params, last)); });
           })
      .def("finish_step", [](const Self<EveryStep>& e) { translate("strait.ddp_hook", [&] { e->finishStep(); }); })
      .def("checkpoint",
           [](const Self<EveryStep>& e, int64_t step, std::vector<at::Tensor> params, const at::Tensor& extra) {
             translate("strait.Checkpoints.step",
                       [&] { e->checkpoint(step, params, bytesOfTensor(extra, "strait.Checkpoints.step")); });
           })
      .def("resume",
           [](const Self<EveryStep>& e, std::vector<at::Tensor> params) {
             return translate("strait.Checkpoints.resume", [&] { return e->resume(params); });
           })
      .def("resumed_extra", [](const Self<EveryStep>& e) { return toTensor(e->resumedExtra()); })
      .def("register_params",
           [](const Self<EveryStep>& e, std::vector<at::Tensor> params) {
             translate("strait.Checkpoints", [&] { e->registerParams(std::move(params)); });
           })
      .def("joins_waiting",
           [](const Self<EveryStep>& e) { return translate("strait.Checkpoints.step", [&] { return e->joinsWaiting(); }); })
      .def("serve_joins",
           [](const Self<EveryStep>& e, int64_t step, std::vector<at::Tensor> params, const at::Tensor& extra) {
             translate("strait.Checkpoints.step",
                       [&] { e->serveJoins(step, params, bytesOfTensor(extra, "strait.Checkpoints.step")); });
           });

  using strait::torch::ShardedDiLoCo;
  m.class_<ShardedDiLoCo>("ShardedDiLoCo")
      .def(::torch::init([](const Self<Session>& session, std::vector<std::string> names,
                            std::vector<at::Tensor> locals, std::vector<std::vector<int64_t>> shapes,
                            std::optional<int64_t> sync_every, std::optional<double> outer_lr,
                            std::optional<double> outer_momentum, std::optional<bool> nesterov,
                            std::optional<int64_t> fragments, std::optional<bool> overlap, const std::string& pipeline,
                            std::optional<bool> sparseloco) {
        return translate("strait.DiLoCo", [&] {
          DiLoCoOptions o{sync_every, outer_lr, outer_momentum, nesterov, fragments, overlap, pipeline, sparseloco};
          return c10::make_intrusive<ShardedDiLoCo>(session, std::move(names), std::move(locals), std::move(shapes),
                                                    std::move(o));
        });
      }))
      .def("step", [](const Self<ShardedDiLoCo>& d) { return translate("strait.DiLoCo.step", [&] { return d->step(); }); })
      .def("write_checkpoint",
           [](const Self<ShardedDiLoCo>& d, const at::Tensor& extra) {
             translate("strait.DiLoCo.write_checkpoint",
                       [&] { d->writeCheckpoint(bytesOfTensor(extra, "strait.DiLoCo.write_checkpoint")); });
           })
      .def("resumed_extra", [](const Self<ShardedDiLoCo>& d) { return toTensor(d->resumedExtra()); })
      .def("flush", [](const Self<ShardedDiLoCo>& d) { translate("strait.DiLoCo.flush", [&] { d->flush(); }); })
      .def("syncs", [](const Self<ShardedDiLoCo>& d) { return d->syncs(); })
      .def("local_steps", [](const Self<ShardedDiLoCo>& d) { return d->localSteps(); })
      .def("groups", [](const Self<ShardedDiLoCo>& d) { return d->groups(); })
      .def("resumed", [](const Self<ShardedDiLoCo>& d) { return d->resumed(); })
      .def("sync_every", [](const Self<ShardedDiLoCo>& d) { return d->syncEvery(); })
      .def("outer_lr", [](const Self<ShardedDiLoCo>& d) { return d->outerLr(); })
      .def("outer_momentum", [](const Self<ShardedDiLoCo>& d) { return d->outerMomentum(); })
      .def("nesterov", [](const Self<ShardedDiLoCo>& d) { return d->nesterov(); })
      .def("privacy_spent", [](const Self<ShardedDiLoCo>& d) { return d->privacySpent(); });

  using strait::torch::ShardedEveryStep;
  m.class_<ShardedEveryStep>("ShardedEveryStep")
      .def(::torch::init([](const Self<Session>& session, std::vector<std::string> names,
                            std::vector<at::Tensor> locals, std::vector<std::vector<int64_t>> shapes,
                            std::vector<std::vector<int64_t>> units) {
        return translate("strait.fsdp_hook", [&] {
          return c10::make_intrusive<ShardedEveryStep>(session, std::move(names), std::move(locals), std::move(shapes),
                                                       std::move(units));
        });
      }))
      .def("unit",
           [](const Self<ShardedEveryStep>& e, int64_t m, std::vector<at::Tensor> grads, const std::string& local_error) {
             translate("strait.fsdp_hook", [&] { e->unit(m, grads, local_error); });
           })
      .def("finish_step",
           [](const Self<ShardedEveryStep>& e) { return translate("strait.fsdp_hook", [&] { return e->finishStep(); }); })
      .def("abort", [](const Self<ShardedEveryStep>& e, const std::string& why) { e->abort(why); })
      .def("steps", [](const Self<ShardedEveryStep>& e) { return e->steps(); })
      .def("groups", [](const Self<ShardedEveryStep>& e) { return e->groups(); })
      .def("privacy_spent", [](const Self<ShardedEveryStep>& e) { return e->privacySpent(); });

  using strait::torch::ShardedPieces;
  m.class_<ShardedPieces>("ShardedPieces")
      .def(::torch::init([](std::vector<std::vector<int64_t>> shapes, int64_t piece,
                            std::optional<c10::intrusive_ptr<c10d::ProcessGroup>> group) {
        return translate("strait.ShardedPieces", [&] {
          return c10::make_intrusive<ShardedPieces>(std::move(shapes), piece, group.value_or(nullptr));
        });
      }))
      .def("world", [](const Self<ShardedPieces>& p) { return p->world(); })
      .def("rank", [](const Self<ShardedPieces>& p) { return p->rank(); })
      .def("pieces", [](const Self<ShardedPieces>& p) { return p->pieces(); })
      .def("owned", [](const Self<ShardedPieces>& p) { return p->owned(); })
      .def("gather",
           [](const Self<ShardedPieces>& p, std::vector<at::Tensor> locals) {
             return translate("strait.ShardedPieces.gather", [&] { return p->gather(locals); });
           })
      .def("scatter", [](const Self<ShardedPieces>& p, std::vector<at::Tensor> values, std::vector<at::Tensor> out) {
        translate("strait.ShardedPieces.scatter", [&] { p->scatter(values, out); });
      });
}

}  // namespace

// The site gateway for Python. exchange() starts an all-gather and returns at
// once; ready() polls it without blocking (so Python threads keep the GIL
// moving); result() collects it. The network never blocks the interpreter.
class SiteGateway : public ::torch::CustomClassHolder {
 public:
  // policy_path: the site's policy file, "" for none (default egress, no
  // audit log, no differential privacy).
  SiteGateway(const std::string& config_path, const std::string& site, const std::string& policy_path)
      : gateway_(translate("strait.Gateway", [&] {
          const core::JobConfig config = core::JobConfig::load(config_path);
          if (policy_path.empty()) {
            return std::make_unique<transport::Gateway>(transport::GatewayOptions::fromConfig(config, site));
          }
          const core::SitePolicy policy = core::SitePolicy::load(policy_path);
          return std::make_unique<transport::Gateway>(transport::GatewayOptions::fromConfig(config, site, &policy));
        })) {}

  // kind: model_update, model_state, control or metrics (the egress policy's kinds).
  void exchange(int64_t round, const std::string& tag, const at::Tensor& payload, const std::string& kind) {
    translate("strait.Gateway.exchange", [&] {
      const core::MessageKind k = core::parseMessageKind(kind);
      const at::Tensor bytes = bytesCpu(payload, "strait.Gateway.exchange");
      std::vector<uint8_t> v(bytes.data_ptr<uint8_t>(), bytes.data_ptr<uint8_t>() + bytes.numel());
      const Key key{round, tag};
      TORCH_CHECK(pending_.count(key) == 0, "strait.Gateway.exchange: round ", round, " tag '", tag,
                  "' is already pending");
      pending_.emplace(key, gateway_->exchange(static_cast<uint64_t>(round), tag, std::move(v), k));
    });
  }

  bool ready(int64_t round, const std::string& tag) {
    auto it = pending_.find({round, tag});
    TORCH_CHECK(it != pending_.end(), "strait.Gateway.ready: no pending exchange for round ", round, " tag '", tag,
                "'");
    return it->second.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  }

  // Every site's payload in the job's site order (an empty tensor for a
  // missing site) and the names of the missing sites. Blocks until ready.
  std::tuple<std::vector<at::Tensor>, std::vector<std::string>> result(int64_t round, const std::string& tag) {
    return translate("strait.Gateway.result", [&] {
      auto it = pending_.find({round, tag});
      TORCH_CHECK(it != pending_.end(), "strait.Gateway.result: no pending exchange for round ", round, " tag '",
                  tag, "'");
      std::future<transport::RoundResult> f = std::move(it->second);
      pending_.erase(it);
      transport::RoundResult r = f.get();
      std::vector<at::Tensor> payloads;
      for (auto& p : r.payloads) {
        payloads.push_back(p ? toTensor(*p) : at::empty({0}, at::kByte));
        if (p) gateway_->recycle(std::move(*p));
      }
      return std::make_tuple(std::move(payloads), r.missing);
    });
  }

  int64_t siteIndex() const { return static_cast<int64_t>(gateway_->siteIndex()); }

  std::vector<std::string> livePeers() const { return gateway_->livePeers(); }
  std::vector<std::string> returnedPeers() { return gateway_->takeReturnedPeers(); }
  std::vector<std::string> divergedPeers() { return gateway_->takeDivergedPeers(); }

  // Rounds peers opened that this site has not, as "ROUND TAB TAG TAB SITE".
  std::vector<std::string> peerRounds(const std::string& prefix) const {
    std::vector<std::string> out;
    for (const transport::PeerRound& r : gateway_->peerRounds(prefix)) {
      out.push_back(std::to_string(r.round) + "\t" + r.tag + "\t" + r.site);
    }
    return out;
  }

  // Clips and noises x in place (the site policy's privacy section); returns
  // the epsilon spent so far, this release included.
  double privatize(at::Tensor x) {
    return translate("strait.Gateway.privatize", [&] {
      TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                  "strait.Gateway.privatize: x must be a contiguous float32 CPU tensor");
      return gateway_->privatize(x.data_ptr<float>(), static_cast<size_t>(x.numel()));
    });
  }
  double privacySpent() const { return gateway_->privacySpent(); }
  std::string auditHead() const { return gateway_->auditHead(); }
  int64_t auditRecords() const { return static_cast<int64_t>(gateway_->auditRecords()); }

 private:
  using Key = std::pair<int64_t, std::string>;
  std::unique_ptr<transport::Gateway> gateway_;
  std::map<Key, std::future<transport::RoundResult>> pending_;
};

// Static methods only: see the comment at the top of this file.
struct Library : ::torch::CustomClassHolder {};

}  // namespace strait::torch_ext

// Outside namespace strait: the macros name ::torch unqualified.
using namespace strait::torch_ext;  // NOLINT

TORCH_LIBRARY(strait, m) {
  m.def("encode(Tensor x, str pipeline, int seed=0) -> Tensor");
  m.def("decode(Tensor payload, int[] shape) -> Tensor");
  m.def("decode_accumulate(Tensor(a!) acc, Tensor payload, float weight=1.0) -> ()");
  m.class_<Library>("Library")
      .def_static("payload_info", &payloadInfo)
      .def_static("validate_config", &validateConfig)
      .def_static("site_index", &siteIndex)
      .def_static("rule_for", &ruleFor)
      .def_static("build_info", &buildInfo);
  using Compressor = strait::torch::Compressor;
  m.class_<Compressor>("Compressor")
      .def(::torch::init([](const std::string& pipeline, int64_t seed, bool error_feedback) {
        return translate("strait.Compressor", [&] {
          return c10::make_intrusive<Compressor>(pipeline, static_cast<uint64_t>(seed), error_feedback);
        });
      }))
      .def("encode",
           [](const Self<Compressor>& c, const at::Tensor& x) {
             return translate("strait.Compressor.encode", [&] { return c->encode(x); });
           })
      .def("residual", [](const Self<Compressor>& c) { return c->residual(); })
      .def("set_residual",
           [](const Self<Compressor>& c, const at::Tensor& r) {
             translate("strait.Compressor.set_residual", [&] {
               const at::Tensor flat = floatCpu(r, "strait.Compressor.set_residual");
               c->setResidual(flat.data_ptr<float>(), static_cast<size_t>(flat.numel()));
             });
           })
      .def("reset", [](const Self<Compressor>& c) { c->reset(); })
      .def("pipeline", [](const Self<Compressor>& c) { return c->pipeline(); })
      .def("error_feedback", [](const Self<Compressor>& c) { return c->errorFeedback(); });
  registerEngine(m);
  m.class_<SiteGateway>("Gateway")
      .def(::torch::init<std::string, std::string, std::string>())
      .def("exchange", &SiteGateway::exchange)
      .def("privatize", &SiteGateway::privatize)
      .def("privacy_spent", &SiteGateway::privacySpent)
      .def("audit_head", &SiteGateway::auditHead)
      .def("audit_records", &SiteGateway::auditRecords)
      .def("ready", &SiteGateway::ready)
      .def("result", &SiteGateway::result)
      .def("site_index", &SiteGateway::siteIndex)
      .def("live_peers", &SiteGateway::livePeers)
      .def("returned_peers", &SiteGateway::returnedPeers)
      .def("diverged_peers", &SiteGateway::divergedPeers)
      .def("peer_rounds", &SiteGateway::peerRounds);
}

// The same functions serve both keys: each sends CUDA tensors to the device
// codecs (device_codecs.h) and stages what the device does not run.
TORCH_LIBRARY_IMPL(strait, CPU, m) {
  m.impl("encode", &encode);
  m.impl("decode", &decode);
  m.impl("decode_accumulate", &decodeAccumulate);
}

TORCH_LIBRARY_IMPL(strait, CUDA, m) {
  m.impl("encode", &encode);
  m.impl("decode", &decode);
  m.impl("decode_accumulate", &decodeAccumulate);
}

// ------------------------------------------------------- device codecs ---

namespace strait::torch {

namespace {

// The selection of one shape of chunks: keys (rows x len, int32 magnitudes)
// -> a mask of the kk kept in each row.
at::Tensor keepMask(const at::Tensor& keys, int64_t kk) {
  const int64_t len = keys.size(1);
  if (kk >= len) return at::ones_like(keys, at::kBool);
  // The k-th largest key of each row (topk, not kthvalue: a GPU's topk
  // splits one long row over many blocks).
  const at::Tensor kth = std::get<0>(at::topk(keys, kk, 1, true, false)).amin(1, true);
  const at::Tensor greater = keys.gt(kth);
  const at::Tensor ties_wanted = greater.sum(1, true).neg_().add_(kk);
  const at::Tensor tie = keys.eq(kth);
  return greater.logical_or_(tie.logical_and(tie.cumsum(1).le(ties_wanted)));
}

}  // namespace

at::Tensor selectTopK(const at::Tensor& x, const core::DeviceTopKPlan& plan) {
  const int64_t n = static_cast<int64_t>(plan.n);
  TORCH_INTERNAL_ASSERT(x.dim() == 1 && x.numel() == n && x.scalar_type() == at::kFloat && x.is_contiguous());
  const at::Tensor keys = x.view(at::kInt).bitwise_and(0x7fffffff);
  at::Tensor mask;
  if (plan.chunk == 0) {
    mask = keepMask(keys.view({1, n}), static_cast<int64_t>(plan.k)).view({-1});
  } else {
    const int64_t chunk = static_cast<int64_t>(plan.chunk), full = n / chunk, rest = n % chunk;
    std::vector<at::Tensor> parts{
        keepMask(keys.narrow(0, 0, full * chunk).view({full, chunk}), static_cast<int64_t>(plan.k_chunk)).view({-1})};
    if (rest > 0) {
      parts.push_back(keepMask(keys.narrow(0, full * chunk, rest).view({1, rest}), static_cast<int64_t>(plan.k_rest))
                          .view({-1}));
    }
    mask = at::cat(parts);
  }
  return mask.nonzero().view({-1});
}

#if STRAIT_WITH_CUDA

namespace {

void cudaCheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail<Error>("CUDA ", what, ": ", cudaGetErrorString(e));
}

}  // namespace

bool deviceCodecs() { return true; }

bool encodeOnDevice(const at::Tensor& x, const core::Pipeline& p, core::CodecState& state, std::vector<uint8_t>& out,
                    at::Tensor* residual, float decay) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous());
  const at::NoGradGuard no_grad;  // a parameter's tensor must not grow a graph here
  const size_t n = static_cast<size_t>(x.numel());
  std::optional<core::DeviceEncodePlan> dense = p.planDeviceEncode(n, state);
  std::optional<core::DeviceTopKPlan> topk;
  if (!dense) {
    // Top-k's indices travel as int32 on the device.
    if (n == 0 || n > static_cast<size_t>(INT32_MAX)) return false;
    topk = p.planDeviceTopK(n, state);
    if (!topk) return false;
  }
  const core::ValueStageSpec spec = dense ? dense->values : topk->values;
  const uint64_t seed = dense ? dense->seed : topk->seed;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  at::Tensor input = x.reshape({-1});
  if (residual != nullptr) {
    TORCH_CHECK(residual->numel() == x.numel() && residual->device() == x.device() &&
                    residual->scalar_type() == at::kFloat && residual->is_contiguous(),
                "error feedback: the residual must be a contiguous float32 tensor of ", x.numel(), " values on ",
                x.device());
    // As core::ErrorFeedback: residual + x, or decay * residual + x (two
    // roundings, two kernels: never fused).
    input = decay == 1.0f ? at::add(residual->reshape({-1}), input)
                          : at::mul(residual->reshape({-1}), decay).add_(input);
  }
  // The CPU encoder names a value the format refuses, with the message
  // users know (the state's seed does not matter to it).
  auto refuse = [&](uint64_t where) {
    const at::Tensor host = input.cpu();
    core::CodecState scratch(state.seed());
    std::vector<uint8_t> ignored;
    p.encode(host.data_ptr<float>(), n, core::TensorShape{}, scratch, ignored);
    fail<Error>("the device encoder refused a value the CPU encoder accepts (position ", where,
                "); please report this");
  };
  at::Tensor values = input;  // what the value section encodes
  at::Tensor indices;         // top-k: int32, on the device
  std::vector<uint32_t> host_indices;
  if (topk) {
    if (!at::isfinite(input).all().item<bool>()) refuse(0);
    indices = selectTopK(input, *topk).to(at::kInt);
    values = input.index_select(0, indices);
    host_indices.resize(topk->k);
    if (static_cast<uint64_t>(indices.numel()) != topk->k) {
      fail<Error>("device top-k selected ", indices.numel(), " values where ", topk->k, " were due; please report this");
    }
  }
  const uint64_t count = static_cast<uint64_t>(values.numel());
  const cuda::EncodeLayout lay = cuda::encodeLayout(spec, count);
  const at::Tensor buf = at::empty({static_cast<int64_t>(lay.total)}, x.options().dtype(at::kByte));
  uint8_t* dev = buf.data_ptr<uint8_t>();
  cuda::encodeValues(spec, values.data_ptr<float>(), count, seed, dev, stream);
  std::vector<uint8_t> body(lay.scale_bytes + lay.code_bytes);
  uint64_t status = 0;
  if (lay.scale_bytes > 0) {
    cudaCheck(cudaMemcpyAsync(body.data(), dev, lay.scale_bytes, cudaMemcpyDeviceToHost, stream), "copy of the scales");
  }
  if (lay.code_bytes > 0) {
    cudaCheck(cudaMemcpyAsync(body.data() + lay.scale_bytes, dev + lay.codes_offset, lay.code_bytes,
                              cudaMemcpyDeviceToHost, stream),
              "copy of the codes");
  }
  cudaCheck(cudaMemcpyAsync(&status, dev + lay.status_offset, sizeof status, cudaMemcpyDeviceToHost, stream),
            "copy of the status");
  if (topk) {
    cudaCheck(cudaMemcpyAsync(host_indices.data(), indices.data_ptr<int32_t>(), host_indices.size() * 4,
                              cudaMemcpyDeviceToHost, stream),
              "copy of the indices");
  }
  if (residual != nullptr) {
    // The new residual: input - decoded, added as the CPU does (weight -1),
    // before the stream is waited on so nothing is left running. input is a
    // fresh tensor: on a refusal below the residual stays as it was.
    cuda::decodeValues(spec, dev, dev + lay.codes_offset, count,
                       topk ? reinterpret_cast<const uint32_t*>(indices.data_ptr<int32_t>()) : nullptr,
                       input.data_ptr<float>(), -1.0f, true, stream);
  }
  cudaCheck(cudaStreamSynchronize(stream), "encode");
  if (status != UINT64_MAX) refuse(status);
  if (dense) {
    out = dense->header;
  } else {
    out = topk->header;
    p.appendTopKHead(*topk, host_indices, out);
  }
  out.insert(out.end(), body.begin(), body.end());
  if (residual != nullptr) *residual = input.view(residual->sizes());
  return true;
}

bool decodeOnDevice(const uint8_t* payload, size_t size, at::Tensor& out, float weight, bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.is_cuda() && out.scalar_type() == at::kFloat && out.is_contiguous());
  if (accumulate && !std::isfinite(weight)) {
    fail<InvalidArgument>("decodeAccumulate: weight ", weight, " is not finite");
  }
  const at::NoGradGuard no_grad;
  const std::optional<core::DeviceDecodePlan> plan =
      core::planDeviceDecode(payload, size, static_cast<size_t>(out.numel()));
  if (!plan) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  // Only the compressed body (and top-k's indices) crosses to the device,
  // staged through pinned memory: copy_ with non_blocking records the copy
  // with torch's host allocator, so the staging block outlives the transfer.
  const auto upload = [&](const void* src, size_t bytes) {
    at::Tensor staged = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions(at::kByte).pinned_memory(true));
    if (bytes > 0) std::memcpy(staged.data_ptr<uint8_t>(), src, bytes);
    at::Tensor on_device = at::empty({static_cast<int64_t>(bytes)}, out.options().dtype(at::kByte));
    on_device.copy_(staged, /*non_blocking=*/true);
    return on_device;
  };
  const at::Tensor body = upload(payload + plan->body_offset, size - plan->body_offset);
  at::Tensor indices;
  if (!plan->dense) {
    indices = upload(plan->indices.data(), plan->indices.size() * 4);
    if (!accumulate) out.zero_();
  }
  const uint8_t* scales = body.data_ptr<uint8_t>();
  cuda::decodeValues(plan->values, scales, scales + core::lanes::scaleBytes(plan->values, plan->count), plan->count,
                     plan->dense ? nullptr : reinterpret_cast<const uint32_t*>(indices.data_ptr<uint8_t>()),
                     out.data_ptr<float>(), weight, accumulate, stream);
  return true;
}

#else

bool deviceCodecs() { return false; }
bool encodeOnDevice(const at::Tensor&, const core::Pipeline&, core::CodecState&, std::vector<uint8_t>&, at::Tensor*,
                    float) {
  return false;
}
bool decodeOnDevice(const uint8_t*, size_t, at::Tensor&, float, bool) { return false; }

#endif

// One definition for both builds: where the device codecs are not built,
// decodeOnDevice declines and CUDA tensors take the host's arithmetic.
void accumulateExact(const uint8_t* payload, size_t size, at::Tensor acc, float weight) {
  if (acc.is_cuda() && decodeOnDevice(payload, size, acc, weight, true)) return;
  if (acc.is_cpu()) {
    core::decodeAccumulate(payload, size, acc.data_ptr<float>(), size_t(acc.numel()), weight);
    return;
  }
  // A structure decoded on the host (random-k, low-rank), or another device:
  // the CPU's arithmetic on a copy (a torch add would fuse w * v + acc).
  at::Tensor host = acc.to(at::kCPU).contiguous();
  core::decodeAccumulate(payload, size, host.data_ptr<float>(), size_t(host.numel()), weight);
  acc.copy_(host);
}

uint64_t digestOf(const at::Tensor& flat, uint64_t first) {
#if STRAIT_WITH_CUDA
  if (flat.is_cuda()) {
    const at::NoGradGuard no_grad;
    const at::Tensor t = flat.to(at::kFloat).contiguous();
    const c10::cuda::CUDAGuard guard(t.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
    const at::Tensor sum = at::empty({1}, t.options().dtype(at::kLong));
    cuda::digest(t.data_ptr<float>(), static_cast<uint64_t>(t.numel()), first,
                 reinterpret_cast<uint64_t*>(sum.data_ptr<int64_t>()), stream);
    uint64_t d = 0;
    cudaCheck(cudaMemcpyAsync(&d, sum.data_ptr<int64_t>(), sizeof d, cudaMemcpyDeviceToHost, stream),
              "copy of the digest");
    cudaCheck(cudaStreamSynchronize(stream), "digest");
    return d;
  }
#endif
  const at::Tensor t = flat.detach().to(at::kCPU, at::kFloat).contiguous();
  return core::digestSum(t.data_ptr<float>(), static_cast<size_t>(t.numel()), first);
}

}  // namespace strait::torch
