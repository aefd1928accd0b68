#pragma once
// The codecs on the GPU: value sections encoded and decoded by CUDA kernels
// whose per-element arithmetic is core/codec/impl/lanes.h, the same functions
// the CPU codecs use, so a GPU gives the CPU's payload bytes and decoded bits.
// No torch or CUDA types here (the stream is a cudaStream_t passed as void*):
// ops.cc, compiled by g++, calls these; codecs.cu, compiled by nvcc,
// implements them.

#include <cstdint>

#include "core/codec/value_stage.h"

namespace strait::torch_ext::cuda {

// Where the device writes an encoded section body of n values: block scales
// at offset 0 (scale_bytes), codes or values from codes_offset (16-aligned),
// and an 8-byte status word at status_offset. total is the buffer's size.
struct EncodeLayout {
  uint64_t scale_bytes = 0;
  uint64_t code_bytes = 0;
  uint64_t codes_offset = 0;
  uint64_t status_offset = 0;
  uint64_t total = 0;
};
EncodeLayout encodeLayout(const core::ValueStageSpec& spec, uint64_t n);

// Encodes x[0..n) (device memory, float32) into buffer (device memory,
// layout.total bytes, 16-aligned): scales, codes, and a status word that
// ends as UINT64_MAX, or the position of the first block (blockwise kinds) or
// group of 8 values (float kinds) the format refuses (NaN, Inf, out of
// range); the caller then lets the CPU encoder name the value. Asynchronous
// on stream. Throws strait::Error if a launch fails.
void encodeValues(const core::ValueStageSpec& spec, const float* x, uint64_t n, uint64_t seed, uint8_t* buffer,
                  void* stream);

// Decodes a validated section body (scales then codes, device memory, any
// alignment) of count values: out[i] = v_i, or out[i] += weight * v_i
// (accumulate), where i is indices[j] for value j when indices (device
// memory) is given, else j. Asynchronous on stream.
void decodeValues(const core::ValueStageSpec& spec, const uint8_t* scales, const uint8_t* data, uint64_t count,
                  const uint32_t* indices, float* out, float weight, bool accumulate, void* stream);

// *sum (device memory) = core::digestSum(x, n, first) (x in device memory): each
// thread sums digestTerm over its elements, warps and blocks add with
// atomics. A sum mod 2^64 is free of order: the CPU's bits.
void digest(const float* x, uint64_t n, uint64_t first, uint64_t* sum, void* stream);

}  // namespace strait::torch_ext::cuda
