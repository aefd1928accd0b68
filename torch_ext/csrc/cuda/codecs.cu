// The codecs' CUDA kernels (codecs.h). One warp per codec block for the
// blockwise kinds (int, qsgd, sign): the lanes find the block's largest
// magnitude (and qsgd's / sign's sums, on four lanes in the CPU's order),
// lane 0 writes the scale, and every lane packs its groups of 8 values into
// whole bytes. The float kinds and every decode: one thread per group of 8.
// What each lane computes is core/codec/impl/lanes.h, shared with the CPU;
// tests/cpp/core/codec/lanes_test.cc runs this launch structure on the CPU.
// Compiled with -fmad=false: a*b+c stays a multiply then an add, as on the CPU.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/codec/impl/lanes.h"
#include "core/digest.h"
#include "core/error.h"
#include "core/random.h"
#include "torch_ext/csrc/cuda/codecs.h"

namespace strait::torch_ext::cuda {

namespace L = ::strait::core::lanes;
using core::ValueStageSpec;

namespace {

constexpr unsigned kFull = 0xffffffffU;
constexpr int kThreads = 256;
constexpr uint64_t kMaxGrid = 1U << 16;

uint64_t roundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b * b; }

__device__ __forceinline__ uint32_t warpMax(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Stores the low Bits bytes of packed at o (aligned to Bits bytes).
template <int Bits>
__device__ __forceinline__ void storeBytes(uint8_t* o, uint64_t packed) {
  if (Bits == 8) *reinterpret_cast<uint64_t*>(o) = packed;
  if (Bits == 4) *reinterpret_cast<uint32_t*>(o) = static_cast<uint32_t>(packed);
  if (Bits == 2) *reinterpret_cast<uint16_t*>(o) = static_cast<uint16_t>(packed);
  if (Bits == 1) *o = static_cast<uint8_t>(packed);
}

// Blockwise kinds. Bits == 1 is sign.
template <int Bits, bool Stochastic, bool L2>
__global__ void encodeBlocksKernel(const float* x, uint64_t n, uint32_t block, uint64_t seed, float* scales,
                                   uint8_t* codes, unsigned long long* status) {
  const uint32_t lane = threadIdx.x % L::kLanes;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * blockDim.x / L::kLanes;
  const uint64_t nblocks = (n + block - 1) / block;
  for (uint64_t b = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / L::kLanes; b < nblocks;
       b += warps) {
    const float* xb = x + b * block;
    const uint32_t len = static_cast<uint32_t>(min(static_cast<uint64_t>(block), n - b * block));
    const uint32_t m = warpMax(L::laneAbsMax(xb, len, lane));
    constexpr bool kSign = Bits == 1;
    double sum = 0;
    if (L2 || kSign) {
      const double p = lane < 4 ? L::partialSum<!kSign>(xb, len, lane) : 0.0;
      sum = L::combineSums(__shfl_sync(kFull, p, 0), __shfl_sync(kFull, p, 1), __shfl_sync(kFull, p, 2),
                           __shfl_sync(kFull, p, 3));
    }
    const L::BlockScale s = L::blockScale<Bits, L2>(m, sum, len);
    if (lane == 0) {
      scales[b] = s.scale;
      if (s.mode >= L::kScaleNonFinite) atomicMin(status, static_cast<unsigned long long>(b));
    }
    if (s.mode >= L::kScaleNonFinite) continue;
    const uint32_t key = Stochastic ? core::random::blockKey(seed, b) : 0;
    uint8_t* cb = codes + b * block * Bits / 8;
    for (uint32_t j0 = lane * L::kGroup; j0 < len; j0 += L::kStride) {
      uint64_t packed;
      if constexpr (kSign) {
        packed = L::signGroup(xb, j0, len);
      } else {
        packed = L::intGroup<Bits, Stochastic>(xb, j0, len, s, key);
      }
      uint8_t* o = cb + j0 * Bits / 8;
      const uint32_t bytes = L::groupBytes<Bits>(j0, len);
      if (bytes == Bits) {
        storeBytes<Bits>(o, packed);
      } else {
        for (uint32_t k = 0; k < bytes; ++k) o[k] = static_cast<uint8_t>(packed >> (8 * k));
      }
    }
  }
}

// fp32, fp16, bf16: groups of 8 values; a group holding a value at or above
// the limit (NaN, Inf, out of range) is refused.
__global__ void encodeFloatsKernel(ValueStageSpec spec, const float* x, uint64_t n, uint8_t* out,
                                   unsigned long long* status) {
  const uint64_t groups = (n + L::kGroup - 1) / L::kGroup;
  const uint32_t width = spec.bits / 8;  // bytes per value
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t i0 = g * L::kGroup;
    const uint32_t valid = static_cast<uint32_t>(min(static_cast<uint64_t>(L::kGroup), n - i0));
    const uint32_t m = L::laneAbsMax(x + i0, valid, 0);
    if (m >= spec.limit) atomicMin(status, static_cast<unsigned long long>(g));
    alignas(16) uint8_t buf[32];
    L::floatGroup(spec.kind, x, i0, n, buf);
    uint8_t* o = out + i0 * width;
    if (valid == L::kGroup) {
      const uint4* src = reinterpret_cast<const uint4*>(buf);
      uint4* dst = reinterpret_cast<uint4*>(o);
      dst[0] = src[0];
      if (width == 4) dst[1] = src[1];
    } else {
      for (uint32_t k = 0; k < valid * width; ++k) o[k] = buf[k];
    }
  }
}

__global__ void decodeKernel(ValueStageSpec spec, const uint8_t* scales, const uint8_t* data, uint64_t count,
                             const uint32_t* indices, float* out, float weight, bool accumulate) {
  const uint64_t groups = (count + L::kGroup - 1) / L::kGroup;
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t i0 = g * L::kGroup;
    float v[L::kGroup];
    const uint32_t valid = L::decodeGroup(spec, scales, data, i0, count, v);
    if (indices != nullptr) {
      for (uint32_t l = 0; l < valid; ++l) L::store(out + indices[i0 + l], v[l], weight, accumulate);
    } else if (valid == L::kGroup && (reinterpret_cast<uintptr_t>(out + i0) % 16) == 0) {
      float4* o = reinterpret_cast<float4*>(out + i0);
      float4 a = o[0];
      float4 b = o[1];
      L::store(&a.x, v[0], weight, accumulate);
      L::store(&a.y, v[1], weight, accumulate);
      L::store(&a.z, v[2], weight, accumulate);
      L::store(&a.w, v[3], weight, accumulate);
      L::store(&b.x, v[4], weight, accumulate);
      L::store(&b.y, v[5], weight, accumulate);
      L::store(&b.z, v[6], weight, accumulate);
      L::store(&b.w, v[7], weight, accumulate);
      o[0] = a;
      o[1] = b;
    } else {
      for (uint32_t l = 0; l < valid; ++l) L::store(out + i0 + l, v[l], weight, accumulate);
    }
  }
}

__global__ void digestKernel(const float* x, uint64_t n, uint64_t first, unsigned long long* sum) {
  unsigned long long s = 0;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    s += core::digestTerm(__float_as_uint(x[i]), first + i);
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  if (threadIdx.x % L::kLanes == 0) atomicAdd(sum, s);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail<Error>("CUDA ", what, ": ", cudaGetErrorString(e));
}

unsigned gridFor(uint64_t items_per_thread_groups) {
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min(kMaxGrid, (items_per_thread_groups + kThreads - 1) / kThreads)));
}

template <int Bits, bool Stochastic, bool L2>
void launchBlocks(const ValueStageSpec& spec, const float* x, uint64_t n, uint64_t seed, uint8_t* buffer,
                  const EncodeLayout& lay, cudaStream_t stream) {
  const uint64_t nblocks = (n + spec.block - 1) / spec.block;
  encodeBlocksKernel<Bits, Stochastic, L2><<<gridFor(nblocks * L::kLanes), kThreads, 0, stream>>>(
      x, n, spec.block, seed, reinterpret_cast<float*>(buffer), buffer + lay.codes_offset,
      reinterpret_cast<unsigned long long*>(buffer + lay.status_offset));
}

}  // namespace

EncodeLayout encodeLayout(const ValueStageSpec& spec, uint64_t n) {
  EncodeLayout l;
  l.scale_bytes = L::scaleBytes(spec, n);
  l.code_bytes = L::codeBytes(spec, n);
  l.codes_offset = roundUp(l.scale_bytes, 16);
  // Whole groups: a full group's vector store never runs past the buffer.
  l.status_offset = l.codes_offset + roundUp(l.code_bytes, 32);
  l.total = l.status_offset + 16;
  return l;
}

void encodeValues(const ValueStageSpec& spec, const float* x, uint64_t n, uint64_t seed, uint8_t* buffer,
                  void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const EncodeLayout lay = encodeLayout(spec, n);
  check(cudaMemsetAsync(buffer + lay.status_offset, 0xff, 8, stream), "memset");
  if (n == 0) return;
  switch (spec.kind) {
    case L::kFp32:
    case L::kFp16:
    case L::kBf16:
      encodeFloatsKernel<<<gridFor((n + 7) / 8), kThreads, 0, stream>>>(
          spec, x, n, buffer + lay.codes_offset, reinterpret_cast<unsigned long long*>(buffer + lay.status_offset));
      break;
    case L::kSign:
      launchBlocks<1, false, false>(spec, x, n, seed, buffer, lay, stream);
      break;
    case L::kInt:
    case L::kQsgd: {
#define STRAIT_LAUNCH(B)                                                                       \
  if (spec.bits == B) {                                                                        \
    if (spec.l2) launchBlocks<B, true, true>(spec, x, n, seed, buffer, lay, stream);           \
    else if (spec.stochastic) launchBlocks<B, true, false>(spec, x, n, seed, buffer, lay, stream); \
    else launchBlocks<B, false, false>(spec, x, n, seed, buffer, lay, stream);                \
  }
      STRAIT_LAUNCH(8)
      STRAIT_LAUNCH(4)
      STRAIT_LAUNCH(2)
#undef STRAIT_LAUNCH
      break;
    }
    default:
      fail<InvalidArgument>("device encode: unknown value kind ", int(spec.kind));
  }
  check(cudaGetLastError(), "encode launch");
}

void decodeValues(const ValueStageSpec& spec, const uint8_t* scales, const uint8_t* data, uint64_t count,
                  const uint32_t* indices, float* out, float weight, bool accumulate, void* stream_ptr) {
  if (count == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  decodeKernel<<<gridFor((count + 7) / 8), kThreads, 0, stream>>>(spec, scales, data, count, indices, out, weight,
                                                                 accumulate);
  check(cudaGetLastError(), "decode launch");
}

void digest(const float* x, uint64_t n, uint64_t first, uint64_t* sum, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  check(cudaMemsetAsync(sum, 0, sizeof *sum, stream), "memset");
  if (n == 0) return;
  digestKernel<<<gridFor(n), kThreads, 0, stream>>>(x, n, first, reinterpret_cast<unsigned long long*>(sum));
  check(cudaGetLastError(), "digest launch");
}

}  // namespace strait::torch_ext::cuda
