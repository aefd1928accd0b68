#pragma once
// The codecs for CUDA tensors, on their GPU (torch_ext/csrc/cuda/codecs.cu):
// encode leaves only the compressed payload to cross to host memory, decode
// takes the compressed payload to the device and writes (or adds) there.
// The bytes and bits are the CPU codecs' (core/codec/impl/lanes.h). Built
// when STRAIT_WITH_CUDA; otherwise every function declines and callers stage
// through the CPU. Implemented in ops.cc (one torch translation unit fewer).

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/codec/codec.h"

namespace strait::torch {

// True when this build runs the codecs on the GPU.
bool deviceCodecs();

// Encodes x (float32, contiguous, on a GPU) with p on its device into out
// (host memory), drawing the seed from state as Pipeline::encode does.
// With residual (error feedback: a float32 tensor of x's size on x's device,
// updated in place), x + decay * residual is what is encoded, and the
// residual becomes that minus its decoded payload, as core::ErrorFeedback
// computes it. Dense pipelines and top-k (selected with selectTopK) run on
// the device. Returns false, touching nothing, for the structures it does
// not run (random-k, low-rank: the caller stages through the CPU). Throws InvalidArgument, naming the value, on input the
// format refuses, exactly as the CPU encoder does.
bool encodeOnDevice(const at::Tensor& x, const core::Pipeline& p, core::CodecState& state, std::vector<uint8_t>& out,
                    at::Tensor* residual = nullptr, float decay = 1.0f);

// The indices (int64, increasing) a top-k plan keeps of x (1-D float32,
// finite), selected with ATen ops on x's device: per chunk, the k largest
// magnitudes, ties at the k-th to lower indices, as the CPU encoder selects.
// Any device (the tests run it on the CPU against the CPU encoder).
at::Tensor selectTopK(const at::Tensor& x, const core::DeviceTopKPlan& plan);

// Decodes payload (host bytes, validated here in full) into out (float32,
// contiguous, on a GPU): out = decoded, or out += weight * decoded. Returns
// false, touching nothing, for a payload the device does not decode
// (random-k, low-rank). Throws ProtocolError on a malformed payload before
// out is touched.
bool decodeOnDevice(const uint8_t* payload, size_t size, at::Tensor& out, float weight, bool accumulate);

// acc (float32, contiguous, any device) += weight * the payload, with the
// bits core::decodeAccumulate gives on the CPU: on acc's GPU where the device
// decodes the payload, else the CPU's arithmetic on a host copy.
void accumulateExact(const uint8_t* payload, size_t size, at::Tensor acc, float weight);

// core::digestSum(flat, n, first) of flat (float32, 1-D, any device),
// computed where flat lives.
uint64_t digestOf(const at::Tensor& flat, uint64_t first = 0);

}  // namespace strait::torch
