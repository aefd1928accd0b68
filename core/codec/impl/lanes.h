#pragma once
// The value codecs' work cut into the pieces a GPU warp runs: one codec block
// per warp, each of its 32 lanes taking groups of 8 values (lane l: values
// 8l..8l+7, then 256 further on, ...). Eight values fill whole bytes at
// every width (8 x Bits bits = Bits bytes; sign: one byte), and blocks are
// multiples of 8, so no two lanes ever write the same byte.
//
// These functions are the whole per-element arithmetic of the device
// kernels (torch_ext/csrc/cuda/codecs.cu): each is compiled by nvcc for the
// device and by g++ for the host, where the CPU encoder uses the same scale
// rule (intBlockScale) and element functions (kernels.h), and where
// tests/cpp/core/codec/lanes_test.cc runs the kernels' launch on the CPU,
// lane by lane, against the CPU encoder's bytes. So a GPU encodes the bytes
// the CPU does and decodes to the same bits; only the launch (warps,
// shuffles, atomics) is left to a GPU to check (./strait gpu-check).
//
// Nothing here allocates, throws or touches libc: device code.

#include <cstddef>
#include <cstdint>

#include "core/codec/impl/kernels.h"
#include "core/codec/value_stage.h"
#include "core/random.h"

namespace strait::core::lanes {

constexpr uint32_t kLanes = 32;
constexpr uint32_t kGroup = 8;                  // values per lane per step
constexpr uint32_t kStride = kLanes * kGroup;   // values per warp step
constexpr double kMaxFloat = 3.4028234663852886e38;  // FLT_MAX

// Value kinds as on the wire (codec/impl/stages.h, ValueKind).
enum Kind : uint8_t { kFp32 = 1, kFp16 = 2, kBf16 = 3, kInt = 4, kQsgd = 5, kSign = 6 };

using Spec = ValueStageSpec;

// How a block quantises (intBlockScale).
enum ScaleMode : uint8_t {
  kScaleNormal = 0,     // code = quantize(x * inv)
  kScaleTiny = 1,       // max|x| so small that L / max overflows: code = quantize(x / scale) in double
  kScaleNonFinite = 2,  // a NaN or Inf in the block: refused
  kScaleOverflow = 3,   // scale * L would overflow float: refused
};

struct BlockScale {
  float scale;
  float inv;
  uint8_t mode;
};

// The scale of one int / qsgd block from its largest magnitude (as float
// bits) and, for qsgd (L2), its sum of squares. A block so small that top / L
// is not a normal float (max|x| below about 1.5e-36 for int8) gets the float
// at or above top / L, and its codes are computed against that stored scale
// in double precision, so |x - code * scale| <= scale / 2 holds there too and
// no code exceeds L. Decoders accept a scale only if L * scale is finite, so
// a block whose values come too close to FLT_MAX is refused.
template <int Bits, bool L2>
STRAIT_INLINE BlockScale intBlockScale(uint32_t max_bits, double sum_squares) {
  constexpr int L = (1 << (Bits - 1)) - 1;
  if (max_bits >= kernels::kExpMask) return {0.0f, 0.0f, kScaleNonFinite};
  const double top = L2 ? sqrt(sum_squares) : static_cast<double>(kernels::bitsFloat(max_bits));
  float scale;
  float inv;
  if (L2) {
    scale = static_cast<float>(top / L);
    inv = top > 0 ? static_cast<float>(L / top) : 0.0f;
  } else {
    const float amax = kernels::bitsFloat(max_bits);
    scale = amax / L;
    inv = amax > 0 ? L / amax : 0.0f;
  }
  const bool inv_finite = (kernels::floatBits(inv) & 0x7fffffffU) < kernels::kExpMask;
  if (top > 0 && (scale < 1.17549435e-38f || !inv_finite)) {
    float s = static_cast<float>(top / L);
    // The next float up (s is positive and finite here).
    if (static_cast<double>(s) * L < top) s = kernels::bitsFloat(kernels::floatBits(s) + 1U);
    return {s, 1.0f, kScaleTiny};
  }
  if (!(static_cast<double>(scale) * L <= kMaxFloat)) return {scale, 0.0f, kScaleOverflow};
  return {scale, inv, kScaleNormal};
}

// The scale of one block of a blockwise kind, Bits == 1 being sign (mean
// |x|, from the combined sumOf<false>; refused only for a NaN or Inf).
// sum is qsgd's sum of squares or sign's sum of magnitudes, else unused.
template <int Bits, bool L2>
STRAIT_INLINE BlockScale blockScale(uint32_t max_bits, double sum, uint32_t len) {
  if constexpr (Bits == 1) {
    const float scale = static_cast<float>(sum / static_cast<double>(len));
    return {scale, 0.0f, max_bits >= kernels::kExpMask ? kScaleNonFinite : kScaleNormal};
  } else {
    return intBlockScale<Bits, L2>(max_bits, sum);
  }
}

// Bytes a lane writes for its group at j0 of a block of len values: Bits
// for a full group, fewer for the block's last, partial one.
template <int Bits>
STRAIT_INLINE uint32_t groupBytes(uint32_t j0, uint32_t len) {
  return j0 + kGroup <= len ? Bits : ((len - j0) * Bits + 7) / 8;
}

// The value a tiny block quantises (see intBlockScale).
STRAIT_INLINE float tinyInput(float x, float scale) {
  return static_cast<float>(static_cast<double>(x) / scale);
}

// One int / qsgd code, value j of a block.
template <int Bits, bool Stochastic>
STRAIT_INLINE int32_t intCode(float x, const BlockScale& s, uint32_t key, uint32_t j) {
  constexpr int L = (1 << (Bits - 1)) - 1;
  const float y = s.mode == kScaleTiny ? tinyInput(x, s.scale) : x * s.inv;
  return kernels::quantize<L, Stochastic>(y, key, j);
}

// ------------------------------------------------------------ encoding ---

// Largest |x| (as float bits) over the lane's groups of a block of len values.
STRAIT_INLINE uint32_t laneAbsMax(const float* x, uint32_t len, uint32_t lane) {
  uint32_t m = 0;
  for (uint32_t j0 = lane * kGroup; j0 < len; j0 += kStride) {
    const uint32_t end = j0 + kGroup < len ? j0 + kGroup : len;
    for (uint32_t j = j0; j < end; ++j) {
      const uint32_t b = kernels::floatBits(x[j]) & 0x7fffffffU;
      m = b > m ? b : m;
    }
  }
  return m;
}

// Partial sum l (0..3) of kernels::sumOf<Square>: the total is
// (p0 + p1) + (p2 + p3), bit for bit what the CPU computes in one pass.
template <bool Square>
STRAIT_INLINE double partialSum(const float* x, uint32_t len, uint32_t l) {
  double p = 0;
  uint32_t i = 0;
  for (; i + 4 <= len; i += 4) p += kernels::sumTerm<Square>(x[i + l]);
  if (l == 0) {
    for (; i < len; ++i) p += kernels::sumTerm<Square>(x[i]);
  }
  return p;
}

STRAIT_INLINE double combineSums(double p0, double p1, double p2, double p3) { return (p0 + p1) + (p2 + p3); }

// Packs the codes of values j0..j0+7 (those < len) of a block into Bits
// bytes, little-endian in the result: byte i holds values of bits
// [8i, 8i + 8) of the group's code stream, low bits first.
template <int Bits, bool Stochastic>
STRAIT_INLINE uint64_t intGroup(const float* x, uint32_t j0, uint32_t len, const BlockScale& s, uint32_t key) {
  constexpr uint64_t kMask = (uint64_t{1} << Bits) - 1;
  uint64_t packed = 0;
  for (uint32_t l = 0; l < kGroup; ++l) {
    const uint32_t j = j0 + l;
    if (j < len) {
      packed |= (static_cast<uint64_t>(static_cast<uint32_t>(intCode<Bits, Stochastic>(x[j], s, key, j))) & kMask)
                << (l * Bits);
    }
  }
  return packed;
}

// Sign bits of values j0..j0+7 (those < len): bit l set when value j0 + l is
// negative (its sign bit).
STRAIT_INLINE uint8_t signGroup(const float* x, uint32_t j0, uint32_t len) {
  uint32_t byte = 0;
  for (uint32_t l = 0; l < kGroup && j0 + l < len; ++l) byte |= (kernels::floatBits(x[j0 + l]) >> 31) << l;
  return static_cast<uint8_t>(byte);
}

// The bytes of one group of a float kind (fp32: 32 bytes, fp16/bf16: 16) for
// values i0..i0+7 (those < n), written to out.
STRAIT_INLINE void floatGroup(uint8_t kind, const float* x, uint64_t i0, uint64_t n, uint8_t* out) {
  for (uint32_t l = 0; l < kGroup && i0 + l < n; ++l) {
    const float v = x[i0 + l];
    if (kind == kFp32) {
      const uint32_t u = kernels::floatBits(v);
      for (int k = 0; k < 4; ++k) out[4 * l + k] = static_cast<uint8_t>(u >> (8 * k));
    } else {
      const uint16_t h = kind == kFp16 ? kernels::floatToHalf(v) : kernels::floatToBf16(v);
      out[2 * l] = static_cast<uint8_t>(h);
      out[2 * l + 1] = static_cast<uint8_t>(h >> 8);
    }
  }
}

// Bytes of a value section's body (scales, then codes or values) for n
// values: where the codes start, and the total.
STRAIT_INLINE uint64_t blockCount(const Spec& s, uint64_t n) {
  return s.block == 0 ? 0 : (n + s.block - 1) / s.block;
}
STRAIT_INLINE uint64_t scaleBytes(const Spec& s, uint64_t n) {
  return (s.kind == kInt || s.kind == kQsgd || s.kind == kSign) ? 4 * blockCount(s, n) : 0;
}
STRAIT_INLINE uint64_t codeBytes(const Spec& s, uint64_t n) { return (n * s.bits + 7) / 8; }

// ------------------------------------------------------------ decoding ---

STRAIT_INLINE float loadFloat(const uint8_t* p) {
  return kernels::bitsFloat(static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                            (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24));
}

// Value i of a validated section body whose block's scale is `scale`
// (unused by the float kinds), decoded as the CPU decoder does.
STRAIT_INLINE float valueAt(const Spec& s, float scale, const uint8_t* data, uint64_t i) {
  switch (s.kind) {
    case kFp32:
      return loadFloat(data + 4 * i);
    case kFp16:
      return kernels::halfToFloat(static_cast<uint16_t>(data[2 * i] | (data[2 * i + 1] << 8)));
    case kBf16:
      return kernels::bf16ToFloat(static_cast<uint16_t>(data[2 * i] | (data[2 * i + 1] << 8)));
    case kSign: {
      const uint32_t neg = (data[i / 8] >> (i % 8)) & 1U;
      return kernels::bitsFloat(kernels::floatBits(scale) | (neg << 31));
    }
    default: {
      int32_t code;
      if (s.bits == 8) {
        code = kernels::codeAt<8>(data, i);
      } else if (s.bits == 4) {
        code = kernels::codeAt<4>(data, i);
      } else {
        code = kernels::codeAt<2>(data, i);
      }
      return static_cast<float>(code) * scale;
    }
  }
}

// Values i0..i0+7 (those < count; i0 a multiple of kGroup) of a section
// body into v; returns how many there were. One thread of the decode kernel
// runs one group. A block holds a multiple of kGroup values (the parser
// refuses others), so the group's values share one block: its scale is read
// once, not divided out per value.
STRAIT_INLINE uint32_t decodeGroup(const Spec& s, const uint8_t* scales, const uint8_t* data, uint64_t i0,
                                   uint64_t count, float* v) {
  const uint32_t valid = count - i0 < kGroup ? static_cast<uint32_t>(count - i0) : kGroup;
  const float scale = scaleBytes(s, 1) > 0 ? loadFloat(scales + 4 * (i0 / s.block)) : 0.0f;
  for (uint32_t l = 0; l < valid; ++l) v[l] = valueAt(s, scale, data, i0 + l);
  return valid;
}

// out = v, or acc += weight * v (a multiply, then an add: never fused).
STRAIT_INLINE void store(float* out, float v, float weight, bool accumulate) {
  if (accumulate) {
    *out += weight * v;
  } else {
    *out = v;
  }
}

}  // namespace strait::core::lanes
