#pragma once
// Vectorisable inner loops shared by the value codecs. Each is an always-inline
// body; simd.h's STRAIT_DISPATCH instantiates the callers for AVX2 and baseline.
// Every loop keeps IEEE order of operations (no reassociation), so both paths
// produce bitwise-identical results: sites with different CPUs must agree.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/random.h"
#include "core/codec/impl/simd.h"

namespace strait::core::kernels {

STRAIT_INLINE uint32_t floatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

STRAIT_INLINE float bitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

constexpr uint32_t kExpMask = 0x7f800000U;

// Largest |x| as float bits; >= kExpMask means a NaN or Inf is present.
STRAIT_INLINE uint32_t absMaxBits(const float* x, size_t n) {
  uint32_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t b = floatBits(x[i]) & 0x7fffffffU;
    m = b > m ? b : m;
  }
  return m;
}

// float -> fp16, round to nearest even (after Fabian Giesen's
// float_to_half_fast3_rtne); the AVX2 path's F16C conversion gives the same
// bits, and so does the device's.
STRAIT_INLINE uint16_t floatToHalf(float f) {
  uint32_t u = floatBits(f);
  const uint32_t sign = u & 0x80000000U;
  u ^= sign;
  uint16_t o;
  if (u >= (127U + 16U) << 23) {
    o = u > kExpMask ? 0x7e00 : 0x7c00;
  } else if (u < (113U << 23)) {
    const float magic = bitsFloat(126U << 23);  // 0.5: aligns the subnormal bits
    o = static_cast<uint16_t>(floatBits(bitsFloat(u) + magic) - (126U << 23));
  } else {
    const uint32_t mant_odd = (u >> 13) & 1U;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffU + mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

STRAIT_INLINE float halfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000U) << 16;
  const uint32_t em = h & 0x7fffU;
  if (em >= 0x7c00U) return bitsFloat(sign | kExpMask | ((em & 0x3ffU) << 13));
  if (em >= 0x0400U) return bitsFloat(sign | ((em << 13) + (112U << 23)));
  return bitsFloat(sign | floatBits(static_cast<float>(em) * (1.0f / 16777216.0f)));
}

// float -> bf16, round to nearest even (finite input).
STRAIT_INLINE uint16_t floatToBf16(float f) {
  const uint32_t u = floatBits(f);
  return static_cast<uint16_t>((u + 0x7fffU + ((u >> 16) & 1U)) >> 16);
}

STRAIT_INLINE float bf16ToFloat(uint16_t h) { return bitsFloat(static_cast<uint32_t>(h) << 16); }

// One term of a block's sum: x^2 (qsgd's l2 norm) or |x| (sign's mean).
template <bool Square>
STRAIT_INLINE double sumTerm(float x) {
  const double v = x;
  return Square ? v * v : fabs(v);
}

// Sum of squares / absolute values in double with four fixed partial sums:
// partial l adds terms l, l+4, l+8, ... in order, partial 0 also the tail
// past the last whole group of four, and the total is (p0 + p1) + (p2 + p3).
// A fixed order, so every build computes the same bits; the device kernels
// compute the partials on four lanes (partialSum, codec/impl/lanes.h).
template <bool Square>
STRAIT_INLINE double sumOf(const float* x, size_t n) {
  double p[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) p[l] += sumTerm<Square>(x[i + l]);
  }
  for (; i < n; ++i) p[0] += sumTerm<Square>(x[i]);
  return (p[0] + p[1]) + (p[2] + p[3]);
}

STRAIT_INLINE double sumSquares(const float* x, size_t n) { return sumOf<true>(x, n); }
STRAIT_INLINE double sumAbs(const float* x, size_t n) { return sumOf<false>(x, n); }

// Round half to even for |y| < 2^22 without a libm call.
STRAIT_INLINE float roundEven(float y) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (y + kMagic) - kMagic;
}

// One quantised code in [-L, L]: nearest (half to even), or stochastic:
// floor(y + u) with u uniform in [0, 1), which is unbiased (E = y). floor is
// computed as round-to-nearest minus (rounded > y): std::floor and a ternary
// both keep GCC from vectorising the loop.
template <int L, bool Stochastic>
STRAIT_INLINE int32_t quantize(float y, uint32_t key, uint32_t j) {
  if (Stochastic) y += random::uniform01(key, j);
  const float r = roundEven(y);
  int32_t q = static_cast<int32_t>(r);
  if (Stochastic) q -= static_cast<int32_t>(r > y);
  q = q < -L ? -L : q;
  return q > L ? L : q;
}

// Quantises x[0..len) with multiplier inv into packed Bits-bit codes at out.
// Codes are two's complement, value i at bit offset i*Bits, low bits first.
template <int Bits, bool Stochastic>
STRAIT_INLINE void quantizeBlock(const float* x, size_t len, float inv, uint32_t key,
                                 uint8_t* out) {
  constexpr int L = (1 << (Bits - 1)) - 1;
  constexpr uint32_t kMask = (1U << Bits) - 1;
  constexpr size_t kPerByte = 8 / Bits;
  const size_t whole = len / kPerByte;
  for (size_t i = 0; i < whole; ++i) {
    uint32_t byte = 0;
    for (size_t l = 0; l < kPerByte; ++l) {
      const size_t j = i * kPerByte + l;
      byte |= (static_cast<uint32_t>(quantize<L, Stochastic>(x[j] * inv, key, uint32_t(j))) & kMask)
              << (l * Bits);
    }
    out[i] = static_cast<uint8_t>(byte);
  }
  if (whole * kPerByte < len) {
    uint32_t byte = 0;
    for (size_t j = whole * kPerByte; j < len; ++j) {
      byte |= (static_cast<uint32_t>(quantize<L, Stochastic>(x[j] * inv, key, uint32_t(j))) & kMask)
              << ((j % kPerByte) * Bits);
    }
    out[whole] = static_cast<uint8_t>(byte);
  }
}

// Sign-extends the Bits-bit code at position j of packed codes.
template <int Bits>
STRAIT_INLINE int32_t codeAt(const uint8_t* codes, size_t j) {
  constexpr size_t kPerByte = 8 / Bits;
  const uint32_t byte = codes[j / kPerByte];
  const int shift = static_cast<int>(32 - Bits - (j % kPerByte) * Bits);
  return static_cast<int32_t>(byte << shift) >> (32 - Bits);
}

// out[j] (= or +=) weight * code[j] * scale for j in [0, len), codes starting
// at a byte boundary.
template <int Bits, bool Accumulate>
STRAIT_INLINE void dequantizeAligned(const uint8_t* codes, size_t len, float scale, float* out,
                                     float weight) {
  constexpr size_t kPerByte = 8 / Bits;
  const size_t whole = len / kPerByte;
  for (size_t i = 0; i < whole; ++i) {
    const uint32_t byte = codes[i];
    for (size_t l = 0; l < kPerByte; ++l) {
      const int shift = static_cast<int>(32 - Bits - l * Bits);
      const float v = static_cast<float>(static_cast<int32_t>(byte << shift) >> (32 - Bits)) * scale;
      if (Accumulate) {
        out[i * kPerByte + l] += weight * v;
      } else {
        out[i * kPerByte + l] = v;
      }
    }
  }
  for (size_t j = whole * kPerByte; j < len; ++j) {
    const float v = static_cast<float>(codeAt<Bits>(codes, j)) * scale;
    if (Accumulate) {
      out[j] += weight * v;
    } else {
      out[j] = v;
    }
  }
}

// True when packed codes hold the one pattern the format forbids, -2^(Bits-1)
// (codes are symmetric in [-L, L]).
template <int Bits>
STRAIT_INLINE bool hasForbiddenCode(const uint8_t* codes, size_t bytes) {
  uint32_t bad = 0;
  for (size_t i = 0; i < bytes; ++i) {
    const uint32_t b = codes[i];
    if (Bits == 8) {
      bad |= (b == 0x80U);
    } else if (Bits == 4) {
      bad |= ((b & 0x0fU) == 0x08U) | ((b & 0xf0U) == 0x80U);
    } else {
      bad |= ((b >> 1) & ~b & 0x55U) != 0;
    }
  }
  return bad != 0;
}

}  // namespace strait::core::kernels
