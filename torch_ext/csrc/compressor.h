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

namespace strait::torch {

class Compressor : public ::torch::CustomClassHolder {
 public:
  // Throws ConfigError on a malformed pipeline.
  // decay: the error-feedback buffer's (SparseLoCo; 1 = the plain residual).
  Compressor(const std::string& pipeline, uint64_t seed, bool error_feedback, float decay = 1.0f)
      : pipeline_(core::Pipeline::parse(pipeline)), state_(seed) {
    if (error_feedback) ef_.emplace(pipeline_, seed, decay);
  }

  // Encodes x (float32, contiguous, on the CPU; its shape guides lowrank)
  // into out. Throws InvalidArgument on non-finite values.
  void encode(const at::Tensor& x, std::vector<uint8_t>& out) {
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

  // The payload of x (float32, any device: staged through the CPU) as a
  // 1-D uint8 CPU tensor.
  at::Tensor encode(const at::Tensor& x) {
    if (x.scalar_type() != at::kFloat) {
      fail<InvalidArgument>("expected a float32 tensor, got ", x.scalar_type(), " (convert with .float())");
    }
    encode(x.to(at::kCPU).contiguous(), scratch_);
    at::Tensor out = at::empty({static_cast<int64_t>(scratch_.size())}, at::kByte);
    if (!scratch_.empty()) std::memcpy(out.data_ptr<uint8_t>(), scratch_.data(), scratch_.size());
    return out;
  }

  // The residual as a float32 CPU tensor (empty without error feedback or
  // before the first encode).
  at::Tensor residual() const {
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
    ef_->setResidual(std::vector<float>(values, values + n));
  }

  void reset() {
    if (ef_) ef_->reset();
  }

  std::string pipeline() const { return pipeline_.toString(); }
  bool errorFeedback() const { return ef_.has_value(); }
  float decay() const { return ef_ ? ef_->decay() : 1.0f; }

 private:
  core::Pipeline pipeline_;
  core::CodecState state_;
  std::optional<core::ErrorFeedback> ef_;
  std::vector<uint8_t> scratch_;
};

}  // namespace strait::torch
