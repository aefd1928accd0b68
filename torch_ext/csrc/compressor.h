#pragma once
// One tensor's compressor over at::Tensor: a pipeline, its codec state and,
// with error feedback, the residual. torch.classes.strait.Compressor in
// Python, and the engine's per-tensor state (session.cc). Not thread-safe:
// one per tensor per process.

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "core/codec/codec.h"
#include "core/codec/error_feedback.h"
#include "core/error.h"
#include "torch_ext/csrc/device_codecs.h"

namespace strait::torch {

class Compressor : public ::torch::CustomClassHolder {
 public:
  // Throws ConfigError on a malformed pipeline.
  // decay: the error-feedback buffer's (SparseLoCo; 1 = the plain residual).
  Compressor(const std::string& pipeline, uint64_t seed, bool error_feedback, float decay = 1.0f)
      : pipeline_(core::Pipeline::parse(pipeline)), state_(seed) {
    if (error_feedback) ef_.emplace(pipeline_, seed, decay);
  }

  // Encodes x (float32, contiguous; its shape guides lowrank) into out.
  // A CUDA tensor is encoded on its GPU where the build can (device_codecs.h;
  // with error feedback the residual then lives on that GPU too) and staged
  // through the CPU otherwise: the same bytes either way. Throws
  // InvalidArgument on non-finite values.
  void encode(const at::Tensor& x, std::vector<uint8_t>& out) {
    if (x.is_cuda()) {
      if (x.scalar_type() != at::kFloat || !x.is_contiguous()) {
        fail<InvalidArgument>("expected a contiguous float32 tensor, got ", x.scalar_type());
      }
      if (deviceCodecs() && encodeOnGpu(x, out)) return;
      encodeOnCpu(x.to(at::kCPU).contiguous(), out);
      return;
    }
    encodeOnCpu(x, out);
  }

  // The payload of x (float32, any device) as a 1-D uint8 CPU tensor.
  at::Tensor encode(const at::Tensor& x) {
    if (x.scalar_type() != at::kFloat) {
      fail<InvalidArgument>("expected a float32 tensor, got ", x.scalar_type(), " (convert with .float())");
    }
    encode(x.contiguous(), scratch_);
    at::Tensor out = at::empty({static_cast<int64_t>(scratch_.size())}, at::kByte);
    if (!scratch_.empty()) std::memcpy(out.data_ptr<uint8_t>(), scratch_.data(), scratch_.size());
    return out;
  }

  // The residual as a float32 CPU tensor (empty without error feedback or
  // before the first encode).
  at::Tensor residual() const {
    if (device_residual_.defined()) return device_residual_.reshape({-1}).to(at::kCPU);
    if (!ef_ || ef_->residual().empty()) return at::empty({0}, at::kFloat);
    const auto& r = ef_->residual();
    at::Tensor out = at::empty({static_cast<int64_t>(r.size())}, at::kFloat);
    std::memcpy(out.data_ptr<float>(), r.data(), r.size() * sizeof(float));
    return out;
  }

  // Throws InvalidArgument without error feedback, on non-finite values or
  // on a size that differs from an earlier encode.
  void setResidual(const float* values, size_t n) {
    if (!ef_) throw InvalidArgument("this compressor has no error feedback");
    if (device_residual_.defined()) {
      if (static_cast<int64_t>(n) != device_residual_.numel()) {
        fail<InvalidArgument>("error feedback: residual of ", n, " values does not match the tensor's ",
                              device_residual_.numel());
      }
      const at::Tensor host = at::from_blob(const_cast<float*>(values), {static_cast<int64_t>(n)}, at::kFloat);
      if (!at::isfinite(host).all().item<bool>()) fail<InvalidArgument>("error feedback: the residual is not finite");
      device_residual_.copy_(host.view(device_residual_.sizes()));
      return;
    }
    ef_->setResidual(std::vector<float>(values, values + n));
  }

  void reset() {
    if (ef_) ef_->reset();
    device_residual_ = at::Tensor();
  }

  std::string pipeline() const { return pipeline_.toString(); }
  bool errorFeedback() const { return ef_.has_value(); }
  float decay() const { return ef_ ? ef_->decay() : 1.0f; }

 private:
  // x on its GPU; false where the device does not run the pipeline.
  bool encodeOnGpu(const at::Tensor& x, std::vector<uint8_t>& out) {
    if (!ef_) return encodeOnDevice(x, pipeline_, state_, out);
    if (!device_residual_.defined()) {
      // The first encode on the GPU: a residual set on the host (a resumed
      // checkpoint, an earlier pipeline) moves there.
      const std::vector<float>& host = ef_->residual();
      if (!host.empty() && static_cast<int64_t>(host.size()) != x.numel()) {
        fail<InvalidArgument>("error feedback: tensor has ", x.numel(), " values but its residual has ", host.size(),
                              "; one ErrorFeedback per tensor");
      }
      at::Tensor r = at::zeros({x.numel()}, x.options());
      if (!host.empty()) {
        r.copy_(at::from_blob(const_cast<float*>(host.data()), {x.numel()}, at::kFloat));
      }
      if (!encodeOnDevice(x, pipeline_, ef_->state(), out, &r, ef_->decay())) return false;
      device_residual_ = r;
      ef_->reset();
      return true;
    }
    if (device_residual_.numel() != x.numel() || device_residual_.device() != x.device()) {
      fail<InvalidArgument>("error feedback: tensor has ", x.numel(), " values on ", x.device(), " but its residual has ",
                            device_residual_.numel(), " on ", device_residual_.device(), "; one ErrorFeedback per tensor");
    }
    return encodeOnDevice(x, pipeline_, ef_->state(), out, &device_residual_, ef_->decay());
  }

  void encodeOnCpu(const at::Tensor& x, std::vector<uint8_t>& out) {
    if (device_residual_.defined()) {
      // This tensor was encoded on a GPU before: its residual comes back.
      const at::Tensor host = device_residual_.reshape({-1}).to(at::kCPU).contiguous();
      device_residual_ = at::Tensor();
      ef_->setResidual(std::vector<float>(host.data_ptr<float>(), host.data_ptr<float>() + host.numel()));
    }
    core::TensorShape shape;
    for (int64_t d : x.sizes()) shape.dims.push_back(d);
    const float* data = x.data_ptr<float>();
    const size_t n = static_cast<size_t>(x.numel());
    if (ef_) {
      ef_->encode(data, n, shape, out);
    } else {
      pipeline_.encode(data, n, shape, state_, out);
    }
  }

  core::Pipeline pipeline_;
  core::CodecState state_;
  std::optional<core::ErrorFeedback> ef_;
  at::Tensor device_residual_;  // error feedback on a GPU (encodeOnGpu)
  std::vector<uint8_t> scratch_;
};

}  // namespace strait::torch
