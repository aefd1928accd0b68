// Value codecs: fp32, fp16, bf16, blockwise int8/int4/int2, qsgd, sign.
// Formats are described in docs/PROTOCOL.md ("Value sections").

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/codec/impl/kernels.h"
#include "core/codec/impl/lanes.h"
#include "core/codec/impl/simd.h"
#include "core/codec/impl/stages.h"

namespace strait::core::codec_impl {

using kernels::bitsFloat;
using kernels::floatBits;
using kernels::kExpMask;

const char* valueKindName(ValueKind kind) {
  switch (kind) {
    case ValueKind::kFp32: return "fp32";
    case ValueKind::kFp16: return "fp16";
    case ValueKind::kBf16: return "bf16";
    case ValueKind::kInt: return "int";
    case ValueKind::kQsgd: return "qsgd";
    case ValueKind::kSign: return "sign";
  }
  return "?";
}

void failNonFinite(const float* in, size_t n, size_t offset) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(in[i])) {
      fail<InvalidArgument>("non-finite input: value ", in[i], " at index ", offset + i,
                            "; strait refuses to send NaN or Inf (check the loss/gradients)");
    }
  }
  fail<InvalidArgument>("non-finite input near index ", offset);
}

void writeValueHeader(uint8_t* out, const ValueStageSpec& spec) {
  out[0] = spec.kind;
  out[1] = spec.bits;
  out[2] = spec.stochastic ? 1 : 0;
  out[3] = 0;
  std::memcpy(out + 4, &spec.block, sizeof spec.block);
}

namespace {

constexpr size_t kChunk = 4096;  // values per L1-sized step of the streaming loops
constexpr double kMaxFloat = static_cast<double>(std::numeric_limits<float>::max());

size_t ceilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------- fp16 ---

}  // namespace

uint16_t floatToHalfScalar(float f) { return kernels::floatToHalf(f); }

float halfToFloatScalar(uint16_t h) { return kernels::halfToFloat(h); }

namespace {

#if STRAIT_HAVE_X86_DISPATCH
STRAIT_TARGET_AVX2 void floatToHalfAvx2(const float* in, size_t n, uint16_t* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(in + i);
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = floatToHalfScalar(in[i]);
}

STRAIT_TARGET_AVX2 void halfToFloatAvx2(const uint16_t* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = halfToFloatScalar(in[i]);
}

STRAIT_TARGET_AVX2 void halfAccumulateAvx2(const uint16_t* in, size_t n, float* acc, float w) {
  size_t i = 0;
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    // mul then add (not fma): the generic path must produce the same bits.
    __m256 v = _mm256_mul_ps(wv, _mm256_cvtph_ps(h));
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), v));
  }
  for (; i < n; ++i) acc[i] += w * halfToFloatScalar(in[i]);
}
#endif

void halfAccumulate(const uint16_t* in, size_t n, float* acc, float w) {
#if STRAIT_HAVE_X86_DISPATCH
  if (simd::useAvx2()) return halfAccumulateAvx2(in, n, acc, w);
#endif
  for (size_t i = 0; i < n; ++i) acc[i] += w * halfToFloatScalar(in[i]);
}

}  // namespace

void floatToHalf(const float* in, size_t n, uint16_t* out) {
#if STRAIT_HAVE_X86_DISPATCH
  if (simd::useAvx2()) return floatToHalfAvx2(in, n, out);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = floatToHalfScalar(in[i]);
}

void halfToFloat(const uint16_t* in, size_t n, float* out) {
#if STRAIT_HAVE_X86_DISPATCH
  if (simd::useAvx2()) return halfToFloatAvx2(in, n, out);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = halfToFloatScalar(in[i]);
}

STRAIT_INLINE uint32_t absMaxBitsBody(const float* x, size_t n) { return kernels::absMaxBits(x, n); }
STRAIT_DISPATCH(uint32_t, absMaxBits, (const float* x, size_t n), (x, n))

namespace {

// ------------------------------------------------------------ dense kernels ---


STRAIT_INLINE void bf16EncodeBody(const float* in, size_t n, uint16_t* out) {
  for (size_t i = 0; i < n; ++i) out[i] = kernels::floatToBf16(in[i]);
}
STRAIT_DISPATCH(void, bf16Encode, (const float* in, size_t n, uint16_t* out), (in, n, out))

STRAIT_INLINE void bf16DecodeBody(const uint16_t* in, size_t n, float* out, float w, bool acc) {
  if (acc) {
    for (size_t i = 0; i < n; ++i) out[i] += w * kernels::bf16ToFloat(in[i]);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = kernels::bf16ToFloat(in[i]);
  }
}
STRAIT_DISPATCH(void, bf16Decode, (const uint16_t* in, size_t n, float* out, float w, bool acc),
                (in, n, out, w, acc))

// Any 16-bit float whose exponent bits (under `mask`) are all ones.
STRAIT_INLINE bool anyExpAllOnesBody(const uint16_t* in, size_t n, uint16_t mask) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= (in[i] & mask) == mask;
  return bad != 0;
}
STRAIT_DISPATCH(bool, anyExpAllOnes, (const uint16_t* in, size_t n, uint16_t mask), (in, n, mask))

STRAIT_INLINE void fp32AccumulateBody(const float* in, size_t n, float* acc, float w) {
  for (size_t i = 0; i < n; ++i) acc[i] += w * in[i];
}
STRAIT_DISPATCH(void, fp32Accumulate, (const float* in, size_t n, float* acc, float w),
                (in, n, acc, w))

// --------------------------------------------------------- blockwise ints ---

// Parameters of a blockwise section, shared by int, qsgd and sign.
struct BlockParams {
  int bits;
  uint32_t block;
  bool stochastic;
  bool l2;  // qsgd: scale from the block's l2 norm instead of its max
};

// Result of encoding blocks: SIZE_MAX, or the index of a value that cannot be
// encoded; `overflow` tells a non-finite input from a norm that overflowed.
struct BlockStatus {
  size_t bad = SIZE_MAX;
  bool overflow = false;
};

// A tiny block (lanes::intBlockScale): codes against the stored scale, in
// double precision. Rare (denormal inputs), so its scratch is allocated here.
template <int Bits, bool Stochastic>
void quantizeTinyBlock(const float* x, size_t len, float scale, uint32_t key, uint8_t* codes) {
  std::vector<float> y(len);
  for (size_t j = 0; j < len; ++j) y[j] = lanes::tinyInput(x[j], scale);
  kernels::quantizeBlock<Bits, Stochastic>(y.data(), len, 1.0f, key, codes);
}

template <int Bits, bool Stochastic, bool L2>
STRAIT_INLINE BlockStatus encodeIntBlocks(const float* in, size_t count, uint32_t block,
                                          uint64_t seed, uint8_t* scales, uint8_t* codes) {
  const size_t nblocks = ceilDiv(count, block);
  for (size_t b = 0; b < nblocks; ++b) {
    const float* x = in + b * block;
    const size_t len = std::min<size_t>(block, count - b * block);
    const uint32_t m = kernels::absMaxBits(x, len);
    const lanes::BlockScale s =
        lanes::intBlockScale<Bits, L2>(m, L2 && m < kExpMask ? kernels::sumSquares(x, len) : 0.0);
    BlockStatus st;
    switch (s.mode) {
      case lanes::kScaleNonFinite:
        for (size_t j = 0; j < len && st.bad == SIZE_MAX; ++j) {
          if (!std::isfinite(x[j])) st.bad = b * block + j;
        }
        return st;
      case lanes::kScaleOverflow:
        st.bad = b * block;
        st.overflow = true;
        return st;
      default:
        break;
    }
    std::memcpy(scales + b * sizeof(float), &s.scale, sizeof s.scale);
    const uint32_t key = Stochastic ? random::blockKey(seed, b) : 0;
    uint8_t* out = codes + b * block * Bits / 8;
    if (s.mode == lanes::kScaleTiny) {
      quantizeTinyBlock<Bits, Stochastic>(x, len, s.scale, key, out);
    } else {
      kernels::quantizeBlock<Bits, Stochastic>(x, len, s.inv, key, out);
    }
  }
  return {};
}

STRAIT_INLINE BlockStatus encodeIntBody(const float* in, size_t count, BlockParams p,
                                        uint64_t seed, uint8_t* scales, uint8_t* codes) {
#define STRAIT_INT_CASE(B)                                                                    \
  if (p.bits == B) {                                                                          \
    if (p.l2) return encodeIntBlocks<B, true, true>(in, count, p.block, seed, scales, codes); \
    if (p.stochastic)                                                                         \
      return encodeIntBlocks<B, true, false>(in, count, p.block, seed, scales, codes);        \
    return encodeIntBlocks<B, false, false>(in, count, p.block, seed, scales, codes);         \
  }
  STRAIT_INT_CASE(8)
  STRAIT_INT_CASE(4)
  STRAIT_INT_CASE(2)
#undef STRAIT_INT_CASE
  return {};
}
STRAIT_DISPATCH(BlockStatus, encodeInt,
                (const float* in, size_t count, BlockParams p, uint64_t seed, uint8_t* scales,
                 uint8_t* codes),
                (in, count, p, seed, scales, codes))

// Sign: bit i set when value i is negative (its sign bit; -0.0 counts as
// negative, which decodes to -scale and is harmless), scale = mean |x|.
STRAIT_INLINE BlockStatus encodeSignBody(const float* in, size_t count, uint32_t block,
                                         uint8_t* scales, uint8_t* bits) {
  const size_t nblocks = ceilDiv(count, block);
  for (size_t b = 0; b < nblocks; ++b) {
    const float* x = in + b * block;
    const size_t len = std::min<size_t>(block, count - b * block);
    if (kernels::absMaxBits(x, len) >= kExpMask) {
      BlockStatus s;
      for (size_t j = 0; j < len && s.bad == SIZE_MAX; ++j) {
        if (!std::isfinite(x[j])) s.bad = b * block + j;
      }
      return s;
    }
    const float scale = lanes::blockScale<1, false>(0, kernels::sumAbs(x, len), static_cast<uint32_t>(len)).scale;
    std::memcpy(scales + b * sizeof(float), &scale, sizeof scale);
    uint8_t* out = bits + b * block / 8;
    const size_t whole = len / 8;
    for (size_t i = 0; i < whole; ++i) {
      uint32_t byte = 0;
      for (uint32_t l = 0; l < 8; ++l) byte |= (floatBits(x[i * 8 + l]) >> 31) << l;
      out[i] = static_cast<uint8_t>(byte);
    }
    if (whole * 8 < len) {
      uint32_t byte = 0;
      for (size_t j = whole * 8; j < len; ++j) byte |= (floatBits(x[j]) >> 31) << (j % 8);
      out[whole] = static_cast<uint8_t>(byte);
    }
  }
  return {};
}
STRAIT_DISPATCH(BlockStatus, encodeSign,
                (const float* in, size_t count, uint32_t block, uint8_t* scales, uint8_t* bits),
                (in, count, block, scales, bits))

// Decodes values [begin, begin+len) that lie inside one block with `scale`.
template <int Bits, bool Accumulate>
STRAIT_INLINE void dequantizeRange(const uint8_t* codes, size_t begin, size_t len, float scale,
                                   float* out, float w) {
  constexpr size_t kPerByte = 8 / Bits;
  size_t j = 0;
  // Head up to a byte boundary, one value at a time.
  while (j < len && (begin + j) % kPerByte != 0) {
    const float v = static_cast<float>(kernels::codeAt<Bits>(codes, begin + j)) * scale;
    if (Accumulate) out[j] += w * v; else out[j] = v;
    ++j;
  }
  if (j < len) {
    kernels::dequantizeAligned<Bits, Accumulate>(codes + (begin + j) / kPerByte, len - j, scale,
                                                 out + j, w);
  }
}

template <bool Accumulate>
STRAIT_INLINE void signValue(const uint8_t* bits, size_t i, uint32_t scale_bits, float* out,
                             float w) {
  const uint32_t neg = (bits[i / 8] >> (i % 8)) & 1U;
  const float v = bitsFloat(scale_bits | (neg << 31));
  if (Accumulate) *out += w * v; else *out = v;
}

template <bool Accumulate>
STRAIT_INLINE void signRange(const uint8_t* bits, size_t begin, size_t len, float scale,
                             float* out, float w) {
  const uint32_t sb = floatBits(scale);
  size_t j = 0;
  for (; j < len && (begin + j) % 8 != 0; ++j) signValue<Accumulate>(bits, begin + j, sb, out + j, w);
  // Whole bytes: eight values each, a shape the vectoriser handles.
  const uint8_t* b = bits + (begin + j) / 8;
  const size_t whole = (len - j) / 8;
  float* o = out + j;
  for (size_t i = 0; i < whole; ++i) {
    const uint32_t byte = b[i];
    for (uint32_t l = 0; l < 8; ++l) {
      const float v = bitsFloat(sb | (((byte >> l) & 1U) << 31));
      if (Accumulate) o[i * 8 + l] += w * v; else o[i * 8 + l] = v;
    }
  }
  for (j += whole * 8; j < len; ++j) signValue<Accumulate>(bits, begin + j, sb, out + j, w);
}

// Walks the blocks overlapping [begin, begin+len) of a blockwise section.
STRAIT_INLINE void decodeBlocksBody(const uint8_t* scales, const uint8_t* codes, int bits,
                                    uint32_t block, size_t begin, size_t len, float* out,
                                    float w, bool acc) {
  size_t done = 0;
  while (done < len) {
    const size_t i = begin + done;
    const size_t b = i / block;
    const size_t seg = std::min<size_t>(len - done, (b + 1) * block - i);
    float scale;
    std::memcpy(&scale, scales + b * sizeof(float), sizeof scale);
    float* o = out + done;
#define STRAIT_DQ(B)                                                \
  case B:                                                           \
    if (acc) dequantizeRange<B, true>(codes, i, seg, scale, o, w);  \
    else dequantizeRange<B, false>(codes, i, seg, scale, o, w);     \
    break;
    switch (bits) {
      STRAIT_DQ(8)
      STRAIT_DQ(4)
      STRAIT_DQ(2)
      case 1:
        if (acc) signRange<true>(codes, i, seg, scale, o, w);
        else signRange<false>(codes, i, seg, scale, o, w);
        break;
      default: break;
    }
#undef STRAIT_DQ
    done += seg;
  }
}
STRAIT_DISPATCH(void, decodeBlocks,
                (const uint8_t* scales, const uint8_t* codes, int bits, uint32_t block,
                 size_t begin, size_t len, float* out, float w, bool acc),
                (scales, codes, bits, block, begin, len, out, w, acc))

STRAIT_INLINE bool forbiddenCodesBody(const uint8_t* codes, size_t bytes, int bits) {
  switch (bits) {
    case 8: return kernels::hasForbiddenCode<8>(codes, bytes);
    case 4: return kernels::hasForbiddenCode<4>(codes, bytes);
    case 2: return kernels::hasForbiddenCode<2>(codes, bytes);
    default: return false;
  }
}
STRAIT_DISPATCH(bool, forbiddenCodes, (const uint8_t* codes, size_t bytes, int bits),
                (codes, bytes, bits))

// ---------------------------------------------------------------- codecs ---

class Fp32Codec final : public ValueCodec {
 public:
  std::string text() const override { return "fp32"; }
  ValueKind kind() const override { return ValueKind::kFp32; }
  int bits() const override { return 32; }
  ValueStageSpec spec() const override {
    ValueStageSpec s;
    s.kind = static_cast<uint8_t>(ValueKind::kFp32);
    s.bits = 32;
    s.limit = kExpMask;
    return s;
  }
  size_t sectionBytes(size_t count) const override { return kValueHeaderBytes + count * 4; }
  void encode(const float* in, size_t count, uint64_t, uint8_t* out,
              size_t offset) const override {
    writeValueHeader(out, spec());
    out += kValueHeaderBytes;
    for (size_t at = 0; at < count; at += kChunk) {
      const size_t len = std::min(kChunk, count - at);
      if (absMaxBits(in + at, len) >= kExpMask) failNonFinite(in + at, len, offset + at);
      std::memcpy(out + at * 4, in + at, len * 4);
    }
  }
};

// fp16 and bf16: the same chunked loop, a different limit and conversion.
// `limit` is the float bit pattern of the smallest magnitude that would round
// to Inf; such values (and NaN/Inf) are refused with `what_range`.
class Float16Codec final : public ValueCodec {
 public:
  using Convert = void (*)(const float*, size_t, uint16_t*);
  Float16Codec(ValueKind kind, uint32_t limit, const char* what_range, Convert convert)
      : kind_(kind), limit_(limit), what_range_(what_range), convert_(convert) {}

  std::string text() const override { return valueKindName(kind_); }
  ValueKind kind() const override { return kind_; }
  int bits() const override { return 16; }
  ValueStageSpec spec() const override {
    ValueStageSpec s;
    s.kind = static_cast<uint8_t>(kind_);
    s.bits = 16;
    s.limit = limit_;
    return s;
  }
  size_t sectionBytes(size_t count) const override { return kValueHeaderBytes + count * 2; }
  void encode(const float* in, size_t count, uint64_t, uint8_t* out,
              size_t offset) const override {
    writeValueHeader(out, spec());
    out += kValueHeaderBytes;
    uint16_t tmp[kChunk];
    for (size_t at = 0; at < count; at += kChunk) {
      const size_t len = std::min(kChunk, count - at);
      if (absMaxBits(in + at, len) >= limit_) {
        for (size_t j = 0; j < len; ++j) {
          if (!std::isfinite(in[at + j])) failNonFinite(in + at + j, 1, offset + at + j);
          if ((floatBits(in[at + j]) & 0x7fffffffU) >= limit_) {
            fail<InvalidArgument>("value ", in[at + j], " at index ", offset + at + j, " ", what_range_);
          }
        }
      }
      convert_(in + at, len, tmp);
      std::memcpy(out + at * 2, tmp, len * 2);
    }
  }

 private:
  ValueKind kind_;
  uint32_t limit_;
  const char* what_range_;
  Convert convert_;
};

class BlockCodec final : public ValueCodec {
 public:
  BlockCodec(ValueKind kind, BlockParams p) : kind_(kind), p_(p) {}

  std::string text() const override {
    std::string name = kind_ == ValueKind::kQsgd   ? "qsgd"
                       : kind_ == ValueKind::kSign ? "sign"
                                                   : "int" + std::to_string(p_.bits);
    std::string s = name + "(block=" + std::to_string(p_.block);
    if (kind_ == ValueKind::kQsgd) s += ", bits=" + std::to_string(p_.bits);
    if (kind_ == ValueKind::kInt) s += p_.stochastic ? ", rounding=stochastic" : ", rounding=nearest";
    return s + ")";
  }
  ValueKind kind() const override { return kind_; }
  int bits() const override { return p_.bits; }
  ValueStageSpec spec() const override {
    ValueStageSpec s;
    s.kind = static_cast<uint8_t>(kind_);
    s.bits = static_cast<uint8_t>(p_.bits);
    s.stochastic = p_.stochastic;
    s.l2 = p_.l2;
    s.block = p_.block;
    s.limit = kExpMask;
    return s;
  }
  size_t sectionBytes(size_t count) const override {
    return kValueHeaderBytes + ceilDiv(count, p_.block) * 4 + ceilDiv(count * p_.bits, 8);
  }
  void encode(const float* in, size_t count, uint64_t seed, uint8_t* out,
              size_t offset) const override {
    writeValueHeader(out, spec());
    uint8_t* scales = out + kValueHeaderBytes;
    uint8_t* codes = scales + ceilDiv(count, p_.block) * 4;
    BlockStatus st = kind_ == ValueKind::kSign ? encodeSign(in, count, p_.block, scales, codes)
                                               : encodeInt(in, count, p_, seed, scales, codes);
    if (st.bad != SIZE_MAX) {
      if (st.overflow) {
        fail<InvalidArgument>(text(), ": the block starting at index ", offset + st.bad,
                              " has values too close to the float32 limit to quantise "
                              "(its scale times the top code overflows); scale the input down");
      }
      failNonFinite(in + st.bad, 1, offset + st.bad);
    }
  }

 private:
  ValueKind kind_;
  BlockParams p_;
};

}  // namespace

void appendValues(const ValueCodec& codec, const float* in, size_t count, uint64_t seed,
                  std::vector<uint8_t>& out, size_t offset) {
  ByteWriter w(out);
  uint8_t* at = w.extend(codec.sectionBytes(count));
  codec.encode(in, count, seed, at, offset);
}

// ------------------------------------------------------------ decoding ---

ValueSection ValueSection::read(ByteReader& r, uint64_t count) {
  ValueSection s;
  const uint8_t kind = r.get<uint8_t>("value section kind");
  const uint8_t bits = r.get<uint8_t>("value section bits");
  const uint8_t rounding = r.get<uint8_t>("value section rounding");
  const uint8_t reserved = r.get<uint8_t>("value section reserved byte");
  const uint32_t block = r.get<uint32_t>("value section block size");
  if (reserved != 0) fail<ProtocolError>("value section: reserved byte is ", int(reserved), ", must be 0");
  if (rounding > 1) fail<ProtocolError>("value section: rounding flag ", int(rounding), " is not 0 or 1");
  s.count_ = count;
  s.bits_ = bits;
  s.stochastic_ = rounding == 1;
  s.block_ = block;
  auto expectBits = [&](int want) {
    if (bits != want) {
      fail<ProtocolError>("value section ", valueKindName(s.kind_), ": bits = ", int(bits),
                          ", must be ", want);
    }
  };
  auto checkBlock = [&]() {
    if (block < kMinBlock || block > kMaxBlock || block % 8 != 0) {
      fail<ProtocolError>("value section ", valueKindName(s.kind_), ": block size ", block,
                          " is not a multiple of 8 in [", kMinBlock, ", ", kMaxBlock, "]");
    }
  };
  // Lengths are computed in 64 bits from a count the caller has bounded by the
  // payload's own value count, so they cannot overflow.
  switch (kind) {
    case static_cast<uint8_t>(ValueKind::kFp32):
      s.kind_ = ValueKind::kFp32;
      expectBits(32);
      s.data_ = r.take(count * 4, "fp32 values");
      break;
    case static_cast<uint8_t>(ValueKind::kFp16):
    case static_cast<uint8_t>(ValueKind::kBf16):
      s.kind_ = static_cast<ValueKind>(kind);
      expectBits(16);
      s.data_ = r.take(count * 2, "16-bit float values");
      break;
    case static_cast<uint8_t>(ValueKind::kInt):
    case static_cast<uint8_t>(ValueKind::kQsgd):
      s.kind_ = static_cast<ValueKind>(kind);
      if (bits != 8 && bits != 4 && bits != 2) {
        fail<ProtocolError>("value section ", valueKindName(s.kind_), ": bits = ", int(bits),
                            ", must be 8, 4 or 2");
      }
      checkBlock();
      s.scales_ = r.take(ceilDiv(count, block) * 4, "block scales");
      s.data_ = r.take(ceilDiv(count * bits, 8), "packed codes");
      break;
    case static_cast<uint8_t>(ValueKind::kSign):
      s.kind_ = ValueKind::kSign;
      expectBits(1);
      checkBlock();
      s.scales_ = r.take(ceilDiv(count, block) * 4, "block scales");
      s.data_ = r.take(ceilDiv(count, 8), "sign bits");
      break;
    default:
      fail<ProtocolError>("value section: unknown value codec id ", int(kind),
                          " (this build knows 1..6: fp32, fp16, bf16, int, qsgd, sign)");
  }
  return s;
}

ValueStageSpec ValueSection::spec() const {
  ValueStageSpec s;
  s.kind = static_cast<uint8_t>(kind_);
  s.bits = static_cast<uint8_t>(bits_);
  s.block = block_;
  s.l2 = kind_ == ValueKind::kQsgd;
  s.stochastic = stochastic_;
  s.limit = kExpMask;
  return s;
}

void ValueSection::loadCheckedChunk(size_t at, size_t len, void* raw) const {
  if (kind_ == ValueKind::kFp32) {
    std::memcpy(raw, data_ + at * 4, len * 4);
    if (absMaxBits(static_cast<const float*>(raw), len) >= kExpMask) {
      fail<ProtocolError>("fp32 values: non-finite value near index ", at);
    }
    return;
  }
  std::memcpy(raw, data_ + at * 2, len * 2);
  const uint16_t mask = kind_ == ValueKind::kFp16 ? 0x7c00 : 0x7f80;
  if (anyExpAllOnes(static_cast<const uint16_t*>(raw), len, mask)) {
    fail<ProtocolError>(valueKindName(kind_), " values: NaN or Inf near index ", at);
  }
}

void ValueSection::validate() const {
  switch (kind_) {
    case ValueKind::kFp32:
    case ValueKind::kFp16:
    case ValueKind::kBf16: {
      uint32_t tmp[kChunk];
      for (size_t at = 0; at < count_; at += kChunk) {
        loadCheckedChunk(at, std::min<size_t>(kChunk, count_ - at), tmp);
      }
      return;
    }
    case ValueKind::kInt:
    case ValueKind::kQsgd:
    case ValueKind::kSign: {
      const size_t nblocks = ceilDiv(count_, block_);
      for (size_t b = 0; b < nblocks; ++b) {
        uint32_t u;
        std::memcpy(&u, scales_ + b * 4, 4);
        // Sign bit set, Inf or NaN; or so large that top code * scale overflows.
        const double top = kind_ == ValueKind::kSign ? 1.0 : double((1 << (bits_ - 1)) - 1);
        if (u >= kExpMask || !(static_cast<double>(bitsFloat(u)) * top <= kMaxFloat)) {
          fail<ProtocolError>(valueKindName(kind_), " block ", b, ": scale ", bitsFloat(u),
                              " is not a non-negative number with a finite top value");
        }
      }
      if (kind_ != ValueKind::kSign && forbiddenCodes(data_, ceilDiv(count_ * bits_, 8), bits_)) {
        fail<ProtocolError>(valueKindName(kind_), bits_, " codes: the pattern -", 1 << (bits_ - 1),
                            " is not a valid code (codes are in [-", (1 << (bits_ - 1)) - 1, ", ",
                            (1 << (bits_ - 1)) - 1, "])");
      }
      return;
    }
  }
}

void ValueSection::decodeChecked(float* out) const {
  // Float kinds validate each L1-sized chunk just before converting it: one
  // pass over the input instead of two. Blockwise kinds validate up front
  // (scales are few; the code scan is cheap next to the decode).
  if (kind_ == ValueKind::kInt || kind_ == ValueKind::kQsgd || kind_ == ValueKind::kSign) {
    validate();
    decode(0, count_, out);
    return;
  }
  uint16_t tmp[kChunk];
  for (size_t at = 0; at < count_; at += kChunk) {
    const size_t len = std::min<size_t>(kChunk, count_ - at);
    if (kind_ == ValueKind::kFp32) {
      loadCheckedChunk(at, len, out + at);
    } else {
      loadCheckedChunk(at, len, tmp);
      if (kind_ == ValueKind::kFp16) halfToFloat(tmp, len, out + at);
      else bf16Decode(tmp, len, out + at, 1.0f, false);
    }
  }
}

void ValueSection::convert16(size_t begin, size_t len, float* out, float weight, bool accumulate) const {
  uint16_t tmp[kChunk];  // the section may sit at any byte offset: copy, then convert
  for (size_t at = 0; at < len; at += kChunk) {
    const size_t n = std::min(kChunk, len - at);
    std::memcpy(tmp, data_ + (begin + at) * 2, n * 2);
    if (kind_ == ValueKind::kBf16) {
      bf16Decode(tmp, n, out + at, weight, accumulate);
    } else if (accumulate) {
      halfAccumulate(tmp, n, out + at, weight);
    } else {
      halfToFloat(tmp, n, out + at);
    }
  }
}

void ValueSection::decode(size_t begin, size_t len, float* out) const {
  switch (kind_) {
    case ValueKind::kFp32:
      std::memcpy(out, data_ + begin * 4, len * 4);
      return;
    case ValueKind::kFp16:
    case ValueKind::kBf16:
      return convert16(begin, len, out, 1.0f, false);
    default:
      decodeBlocks(scales_, data_, bits_, block_, begin, len, out, 1.0f, false);
  }
}

void ValueSection::accumulate(size_t begin, size_t len, float* acc, float weight) const {
  switch (kind_) {
    case ValueKind::kFp32: {
      float tmp[kChunk];
      for (size_t at = 0; at < len; at += kChunk) {
        const size_t n = std::min(kChunk, len - at);
        std::memcpy(tmp, data_ + (begin + at) * 4, n * 4);
        fp32Accumulate(tmp, n, acc + at, weight);
      }
      return;
    }
    case ValueKind::kFp16:
    case ValueKind::kBf16:
      return convert16(begin, len, acc, weight, true);
    default:
      decodeBlocks(scales_, data_, bits_, block_, begin, len, acc, weight, true);
  }
}

// ------------------------------------------------------------ factories ---

namespace {

BlockParams intParams(ArgReader& a, int bits, uint32_t default_block) {
  BlockParams p;
  p.bits = bits;
  p.block = static_cast<uint32_t>(a.integer("block", default_block, kMinBlock, kMaxBlock));
  if (p.block % 8 != 0) a.fail("block", std::to_string(p.block), "a multiple of 8 in [8, 65536]");
  p.stochastic = a.choice("rounding", "nearest", {"nearest", "stochastic"}) == "stochastic";
  p.l2 = false;
  return p;
}

std::shared_ptr<const ValueCodec> makeInt(const StageArgs& args, int bits) {
  ArgReader a(args);
  BlockParams p = intParams(a, bits, 256);
  a.finish();
  return std::make_shared<BlockCodec>(ValueKind::kInt, p);
}

}  // namespace

std::shared_ptr<const ValueCodec> makeFp32(const StageArgs& args) {
  ArgReader(args).finish();
  return std::make_shared<Fp32Codec>();
}
std::shared_ptr<const ValueCodec> makeFp16(const StageArgs& args) {
  ArgReader(args).finish();
  // 65520.0f (0x477ff000) is the first value that rounds to Inf in fp16.
  return std::make_shared<Float16Codec>(ValueKind::kFp16, 0x477ff000U,
                                        "is outside the fp16 range (|x| < 65520, which rounds to at most 65504); use bf16 or int8", floatToHalf);
}
std::shared_ptr<const ValueCodec> makeBf16(const StageArgs& args) {
  ArgReader(args).finish();
  return std::make_shared<Float16Codec>(ValueKind::kBf16, 0x7f7f8000U, "rounds to Inf in bf16", bf16Encode);
}
std::shared_ptr<const ValueCodec> makeInt8(const StageArgs& args) { return makeInt(args, 8); }
std::shared_ptr<const ValueCodec> makeInt4(const StageArgs& args) { return makeInt(args, 4); }
std::shared_ptr<const ValueCodec> makeInt2(const StageArgs& args) { return makeInt(args, 2); }

std::shared_ptr<const ValueCodec> makeQsgd(const StageArgs& args) {
  ArgReader a(args);
  BlockParams p;
  p.bits = static_cast<int>(a.integer("bits", 4, 2, 8, 0));
  if (p.bits != 2 && p.bits != 4 && p.bits != 8) a.fail("bits", std::to_string(p.bits), "2, 4 or 8");
  p.block = static_cast<uint32_t>(a.integer("block", 512, kMinBlock, kMaxBlock));
  if (p.block % 8 != 0) a.fail("block", std::to_string(p.block), "a multiple of 8 in [8, 65536]");
  p.stochastic = true;  // QSGD's levels are stochastic by definition (unbiased)
  p.l2 = true;
  a.finish();
  return std::make_shared<BlockCodec>(ValueKind::kQsgd, p);
}

std::shared_ptr<const ValueCodec> makeSign(const StageArgs& args) {
  ArgReader a(args);
  BlockParams p;
  p.bits = 1;
  p.block = static_cast<uint32_t>(a.integer("block", 256, kMinBlock, kMaxBlock));
  if (p.block % 8 != 0) a.fail("block", std::to_string(p.block), "a multiple of 8 in [8, 65536]");
  p.stochastic = false;
  p.l2 = false;
  a.finish();
  return std::make_shared<BlockCodec>(ValueKind::kSign, p);
}

}  // namespace strait::core::codec_impl
