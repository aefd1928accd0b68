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
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

STRAIT_INLINE float bitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
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

// Sum of squares / absolute values in double with four fixed partial sums
// (a fixed order, so every build computes the same bits).
STRAIT_INLINE double sumSquares(const float* x, size_t n) {
  double p[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) {
      double v = x[i + l];
      p[l] += v * v;
    }
  }
  for (; i < n; ++i) p[0] += static_cast<double>(x[i]) * x[i];
  return (p[0] + p[1]) + (p[2] + p[3]);
}

STRAIT_INLINE double sumAbs(const float* x, size_t n) {
  double p[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) p[l] += std::fabs(static_cast<double>(x[i + l]));
  }
  for (; i < n; ++i) p[0] += std::fabs(static_cast<double>(x[i]));
  return (p[0] + p[1]) + (p[2] + p[3]);
}

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
