#pragma once
// Error feedback: a residual per tensor so that nothing the pipeline did not
// send is lost; it is added to the next step's input instead (Seide et al.
// 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").
//
//   c         = input + residual
//   payload   = encode(c)
//   residual' = c - decode(payload)
//
// so decode(payload) + residual' == input + residual, to within one float
// rounding per element (the subtraction), and exactly where the decoded value
// equals c (values topk kept at fp32) or is zero (values it dropped).
//
// With a decay beta < 1 (SparseLoCo, Sarfi et al. 2025: the buffer takes
// the place of DiLoCo's outer momentum), c = input + beta * residual.

#include <cstdint>
#include <vector>

#include "core/codec/codec.h"

namespace strait::core {

// One tensor's residual and codec state. Not thread-safe; movable.
class ErrorFeedback {
 public:
  // decay in [0, 1] (InvalidArgument otherwise); 1: the plain residual.
  explicit ErrorFeedback(Pipeline pipeline, uint64_t seed = 0x5eed, float decay = 1.0f);

  // Encodes input + residual into out and updates the residual. The first
  // call fixes n; a later call with another n throws InvalidArgument. On a
  // throw (non-finite input) the residual is left as it was.
  void encode(const float* input, size_t n, const TensorShape& shape, std::vector<uint8_t>& out);
  void encode(const float* input, size_t n, std::vector<uint8_t>& out) {
    encode(input, n, TensorShape{}, out);
  }

  const std::vector<float>& residual() const { return residual_; }
  // Replaces the residual (e.g. from a checkpoint). Throws InvalidArgument on
  // non-finite values or a size that differs from an earlier encode().
  void setResidual(std::vector<float> residual);
  void reset() { residual_.clear(); }

  const Pipeline& pipeline() const { return pipeline_; }
  float decay() const { return decay_; }
  // The encoder state (its seeds): a device encoder that keeps the residual
  // on a GPU draws from it, so the two paths stay interchangeable.
  CodecState& state() { return state_; }

 private:
  Pipeline pipeline_;
  CodecState state_;
  float decay_ = 1.0f;
  std::vector<float> residual_;
  std::vector<float> next_;  // input + residual while a step is in progress
};

}  // namespace strait::core
