#include "core/codec/error_feedback.h"

#include <cmath>

#include "core/error.h"

namespace strait::core {

ErrorFeedback::ErrorFeedback(Pipeline pipeline, uint64_t seed, float decay)
    : pipeline_(std::move(pipeline)), state_(seed), decay_(decay) {
  if (!(decay >= 0.0f && decay <= 1.0f)) {
    fail<InvalidArgument>("error feedback: decay ", decay, " is not in [0, 1]");
  }
}

void ErrorFeedback::encode(const float* input, size_t n, const TensorShape& shape,
                           std::vector<uint8_t>& out) {
  if (residual_.empty()) {
    residual_.assign(n, 0.0f);
  } else if (residual_.size() != n) {
    fail<InvalidArgument>("error feedback: tensor has ", n, " values but its residual has ",
                          residual_.size(), "; one ErrorFeedback per tensor");
  }
  if (n > 0 && input == nullptr) fail<InvalidArgument>("error feedback: null input with n = ", n);
  // c is built in a second buffer and swapped in only when the step
  // succeeded, so a throw leaves the residual as it was. Both buffers keep
  // their capacity: a steady-state step allocates nothing.
  next_.resize(n);
  if (decay_ == 1.0f) {
    for (size_t i = 0; i < n; ++i) next_[i] = residual_[i] + input[i];
  } else {
    // Two roundings, never fused (core builds with -ffp-contract=off).
    for (size_t i = 0; i < n; ++i) next_[i] = decay_ * residual_[i] + input[i];
  }
  pipeline_.encode(next_.data(), n, shape, state_, out);
  decodeAccumulate(out.data(), out.size(), next_.data(), n, -1.0f);
  residual_.swap(next_);
}

void ErrorFeedback::setResidual(std::vector<float> residual) {
  if (!residual_.empty() && residual.size() != residual_.size()) {
    fail<InvalidArgument>("error feedback: residual of ", residual.size(),
                          " values does not match the tensor's ", residual_.size());
  }
  for (size_t i = 0; i < residual.size(); ++i) {
    if (!std::isfinite(residual[i])) {
      fail<InvalidArgument>("error feedback: residual value ", residual[i], " at index ", i,
                            " is not finite");
    }
  }
  residual_ = std::move(residual);
}

}  // namespace strait::core
