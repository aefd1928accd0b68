// Value codecs against plain reference implementations: fp16, bf16,
// blockwise int8/int4/int2 (nearest and stochastic), qsgd, sign.

#include <cstring>
#include <limits>

#include "core/codec/impl/simd.h"
#include "core/codec/impl/stages.h"
#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;
using codec_impl::floatToHalf;
using codec_impl::floatToHalfScalar;
using codec_impl::halfToFloat;
using codec_impl::halfToFloatScalar;

float bitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// --------------------------------------------------------------- fp16 ---

TEST(Fp16, ScalarMatchesDispatchedPathOnASweepOfBitPatterns) {
  // Every 251st float bit pattern (covers every exponent, NaN, Inf, subnormals).
  std::vector<float> in;
  for (uint64_t u = 0; u <= 0xffffffffULL; u += 251) in.push_back(bitsToFloat(uint32_t(u)));
  std::vector<uint16_t> fast(in.size());
  floatToHalf(in.data(), in.size(), fast.data());
  for (size_t i = 0; i < in.size(); ++i) {
    const uint16_t ref = floatToHalfScalar(in[i]);
    if (std::isnan(in[i])) {
      ASSERT_EQ(fast[i] & 0x7c00, 0x7c00);
      ASSERT_NE(fast[i] & 0x3ff, 0);
    } else {
      ASSERT_EQ(fast[i], ref) << "float " << in[i] << " path " << simd::pathName();
    }
  }
}

#if defined(__FLT16_MAX__) && defined(__GNUC__) && !defined(__clang__)
TEST(Fp16, ScalarMatchesCompilerFloat16) {
  // The compiler's _Float16 conversion is an independent reference (IEEE RNE).
  for (uint64_t u = 0; u <= 0xffffffffULL; u += 4093) {
    const float f = bitsToFloat(uint32_t(u));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t ref;
    std::memcpy(&ref, &h, 2);
    ASSERT_EQ(floatToHalfScalar(f), ref) << f;
  }
}
#endif

TEST(Fp16, EveryHalfDecodesTheSameOnBothPathsAndRoundTrips) {
  std::vector<uint16_t> all(65536);
  for (uint32_t h = 0; h < 65536; ++h) all[h] = uint16_t(h);
  std::vector<float> fast(65536);
  halfToFloat(all.data(), all.size(), fast.data());
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ref = halfToFloatScalar(uint16_t(h));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(fast[h]));
      continue;
    }
    ASSERT_EQ(std::memcmp(&fast[h], &ref, 4), 0) << h;
    ASSERT_EQ(floatToHalfScalar(ref), h) << "half " << h << " does not round-trip";
  }
}

TEST(Fp16, RoundTripWithinHalfAnUlp) {
  const Pipeline p = Pipeline::parse("fp16");
  for (size_t n : allSizes()) {
    auto x = gaussian(n, n + 1, 3.0f);
    if (n > 2) x[1] = 1e-6f;  // subnormal in fp16
    const auto y = roundTrip(p, x);
    for (size_t i = 0; i < n; ++i) {
      const float bound = std::max(std::fabs(x[i]) * 0x1p-11f, 0x1p-25f);
      ASSERT_LE(std::fabs(y[i] - x[i]), bound) << "n=" << n << " i=" << i;
    }
  }
}

TEST(Fp16, RejectsValuesBeyondItsRange) {
  const Pipeline p = Pipeline::parse("fp16");
  std::vector<float> x(10, 1.0f);
  x[7] = 70000.0f;
  try {
    encodeOnce(p, x);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("index 7"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("fp16 range"), std::string::npos) << e.what();
  }
  x[7] = 65504.0f;  // the largest half: fine
  EXPECT_EQ(roundTrip(p, x)[7], 65504.0f);
  // The range as documented: below 65520 rounds to 65504, from 65520 on to Inf (refused).
  x[7] = 65519.996f;
  EXPECT_EQ(roundTrip(p, x)[7], 65504.0f);
  for (float big : {65520.0f, -65520.0f}) {
    x[7] = big;
    EXPECT_THROW(encodeOnce(p, x), InvalidArgument) << big;
  }
}

// --------------------------------------------------------------- bf16 ---

// Reference: pick the nearer of the two bf16 neighbours, ties to even.
float referenceBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t lo = u & 0xffff0000U;
  const uint32_t hi = lo + 0x10000U;
  const double dx = x, dlo = bitsToFloat(lo), dhi = bitsToFloat(hi);
  const double elo = std::fabs(dx - dlo), ehi = std::fabs(dhi - dx);
  uint32_t pick = elo < ehi ? lo : ehi < elo ? hi : (((lo >> 16) & 1) == 0 ? lo : hi);
  return bitsToFloat(pick);
}

TEST(Bf16, MatchesReferenceRounding) {
  const Pipeline p = Pipeline::parse("bf16");
  for (size_t n : allSizes()) {
    auto x = gaussian(n, 7 * n + 3, 100.0f);
    const auto y = roundTrip(p, x);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(y[i], referenceBf16(x[i])) << x[i];
      ASSERT_LE(std::fabs(y[i] - x[i]), std::fabs(x[i]) * 0x1p-8f);
    }
  }
}

// ------------------------------------------------------- blockwise ints ---

struct IntCase {
  int bits;
  size_t block;
};

// Reference quantiser, written plainly: per block scale = max|x| / L, code =
// round-half-even(x * (L / max|x|)) clamped to [-L, L].
std::vector<float> referenceInt(const std::vector<float>& x, int bits, size_t block) {
  const int L = (1 << (bits - 1)) - 1;
  std::vector<float> y(x.size());
  for (size_t b0 = 0; b0 < x.size(); b0 += block) {
    const size_t b1 = std::min(x.size(), b0 + block);
    float amax = 0;
    for (size_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / L;
    const float inv = amax > 0 ? L / amax : 0.0f;
    for (size_t i = b0; i < b1; ++i) {
      float q = std::nearbyint(x[i] * inv);
      q = std::min<float>(L, std::max<float>(-L, q));
      y[i] = q * scale;
    }
  }
  return y;
}

class IntNearest : public ::testing::TestWithParam<IntCase> {};

std::string caseName(const ::testing::TestParamInfo<IntCase>& p) {
  return "int" + std::to_string(p.param.bits) + "_block" + std::to_string(p.param.block);
}

TEST_P(IntNearest, MatchesReferenceAndStaysWithinHalfAStep) {
  const IntCase c = GetParam();
  const Pipeline p = Pipeline::parse("int" + std::to_string(c.bits) + "(block=" +
                                     std::to_string(c.block) + ")");
  const int L = (1 << (c.bits - 1)) - 1;
  for (size_t n : allSizes()) {
    auto x = gaussian(n, n * 31 + c.bits);
    if (n > 20) std::fill(x.begin() + 8, x.begin() + 16, 0.0f);  // an all-zero block when block=8
    const auto y = roundTrip(p, x);
    const auto ref = referenceInt(x, c.bits, c.block);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(y[i], ref[i]) << "n=" << n << " i=" << i;
      const size_t b0 = i / c.block * c.block;
      float amax = 0;
      for (size_t j = b0; j < std::min(n, b0 + c.block); ++j) amax = std::max(amax, std::fabs(x[j]));
      ASSERT_LE(std::fabs(y[i] - x[i]), 0.5f * amax / L * (1 + 1e-5f) + 1e-30f);
    }
    const size_t bytes = encodeOnce(p, x).size();
    EXPECT_EQ(bytes, p.maxEncodedBytes(n)) << "dense sizes are exact";
    EXPECT_EQ(bytes, 16 + 8 + (n + c.block - 1) / c.block * 4 + (n * c.bits + 7) / 8);
  }
}

INSTANTIATE_TEST_SUITE_P(Blocks, IntNearest,
                         ::testing::Values(IntCase{8, 8}, IntCase{8, 256}, IntCase{4, 8},
                                           IntCase{4, 128}, IntCase{2, 8}, IntCase{2, 64}),
                         caseName);

// Stochastic rounding is unbiased: over N independent seeds the mean decoded
// value of x is within 5 standard errors of x. Each draw lands on one of the
// two neighbouring levels, so its standard deviation is at most step/2 and
// the mean's at most step / (2 sqrt(N)).
void expectUnbiased(const std::string& text, const std::vector<float>& x,
                    const std::vector<float>& step) {
  const Pipeline p = Pipeline::parse(text);
  const int kSeeds = 3000;
  std::vector<double> sum(x.size(), 0.0);
  for (int s = 0; s < kSeeds; ++s) {
    const auto y = roundTrip(p, x, 1000 + s);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_LE(std::fabs(y[i] - x[i]), step[i] * (1 + 1e-5f)) << text << " i=" << i;
      sum[i] += y[i];
    }
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const double mean = sum[i] / kSeeds;
    const double tol = 5.0 * step[i] / (2.0 * std::sqrt(double(kSeeds))) + 1e-7;
    EXPECT_NEAR(mean, x[i], tol) << text << " value " << i;
  }
}

TEST(IntStochastic, UnbiasedForEveryWidth) {
  for (int bits : {8, 4, 2}) {
    const int L = (1 << (bits - 1)) - 1;
    std::vector<float> x = gaussian(37, bits);
    x[0] = 6.0f;  // fixes the block max, so the step is known
    const float step = 6.0f / L;
    expectUnbiased("int" + std::to_string(bits) + "(block=64, rounding=stochastic)", x,
                   std::vector<float>(x.size(), step));
  }
}

TEST(Qsgd, UnbiasedWithNormScaledLevels) {
  for (int bits : {8, 4, 2}) {
    const int L = (1 << (bits - 1)) - 1;
    std::vector<float> x = gaussian(50, 11 * bits);
    double norm = 0;
    for (float v : x) norm += double(v) * v;
    norm = std::sqrt(norm);
    const float step = float(norm / L);
    expectUnbiased("qsgd(bits=" + std::to_string(bits) + ", block=64)", x,
                   std::vector<float>(x.size(), step));
  }
}

// Every magnitude a float can hold, denormals included: each block decodes
// within its stated bound (nearest: half a step of max|x| / L; qsgd: one
// step of ||x|| / L), plus one subnormal ulp where the step itself is below
// the smallest normal float. Before the fix a block with max|x| below about
// 3e-37 (int8) decoded to -max|x| everywhere (L / max|x| overflowed).
TEST(IntAndQsgd, MeetTheirBoundAtEveryMagnitudeFromDenormalToNearFloatMax) {
  constexpr float kUlp = std::numeric_limits<float>::denorm_min();
  for (const char* text : {"int8", "int4", "int2", "int8(block=8)", "qsgd(8)", "qsgd(4)", "qsgd(2)"}) {
    const Pipeline p = Pipeline::parse(text);
    const bool l2 = std::string(text).rfind("qsgd", 0) == 0;
    const int bits = l2 ? std::stoi(std::string(text).substr(5)) : std::stoi(std::string(text).substr(3));
    const int L = (1 << (bits - 1)) - 1;
    const size_t block = std::string(text) == "int8(block=8)" ? 8 : (l2 ? 512 : 256);
    for (int e = -149; e <= 120; e += 7) {  // max|x| from 2^-149 (the smallest denormal) to 2^122
      auto x = gaussian(1000, 1000 + e);
      for (float& v : x) v = std::ldexp(v, e);
      const auto y = roundTrip(p, x, 7);
      double err = 0, ref = 0;
      for (size_t b0 = 0; b0 < x.size(); b0 += block) {
        const size_t b1 = std::min(x.size(), b0 + block);
        double top = 0;
        for (size_t i = b0; i < b1; ++i) top = l2 ? top + double(x[i]) * x[i] : std::max(top, double(std::fabs(x[i])));
        if (l2) top = std::sqrt(top);
        const double step = top / L;
        for (size_t i = b0; i < b1; ++i) {
          const double bound = (l2 ? step : step / 2) * (1 + 1e-5) + kUlp;
          ASSERT_LE(std::fabs(double(y[i]) - x[i]), bound) << text << " 2^" << e << " i=" << i << " x=" << x[i]
                                                           << " y=" << y[i];
          err += (double(y[i]) - x[i]) * (double(y[i]) - x[i]);
          ref += double(x[i]) * x[i];
        }
      }
      if (!l2 && e > -120) {
        EXPECT_LT(std::sqrt(err / ref), 1.0 / L) << text << " 2^" << e;
      }
    }
  }
}

// ----------------------------------------------------------------- sign ---

TEST(Sign, DecodesToSignedBlockMeanMagnitude) {
  for (size_t block : {8, 256}) {
    const Pipeline p = Pipeline::parse("sign(block=" + std::to_string(block) + ")");
    for (size_t n : allSizes()) {
      const auto x = gaussian(n, n + block);
      const auto y = roundTrip(p, x);
      for (size_t b0 = 0; b0 < n; b0 += block) {
        const size_t b1 = std::min(n, b0 + block);
        double mean = 0;
        for (size_t i = b0; i < b1; ++i) mean += std::fabs(double(x[i]));
        const float scale = float(mean / double(b1 - b0));
        for (size_t i = b0; i < b1; ++i) {
          ASSERT_EQ(y[i], std::signbit(x[i]) ? -scale : scale) << "n=" << n << " i=" << i;
        }
      }
      EXPECT_EQ(encodeOnce(p, x).size(), 16 + 8 + (n + block - 1) / block * 4 + (n + 7) / 8);
    }
  }
}

// ------------------------------------------------------------ non-finite ---

TEST(NonFinite, EveryEncoderRejectsNanAndInfNamingTheIndex) {
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()}) {
      for (size_t at : {size_t{0}, size_t{517}, size_t{999}}) {
        auto x = gaussian(1000, at);
        x[at] = bad;
        try {
          encodeOnce(p, x);
          FAIL() << text << " accepted " << bad << " at " << at;
        } catch (const InvalidArgument& e) {
          EXPECT_NE(std::string(e.what()).find("index " + std::to_string(at)), std::string::npos)
              << text << ": " << e.what();
        }
      }
    }
  }
}

TEST(NonFinite, ValuesNearFloatMaxAreRefusedNotTurnedIntoInf) {
  std::vector<float> x(16, 1.0f);
  x[3] = std::numeric_limits<float>::max();
  x[4] = std::numeric_limits<float>::max();  // qsgd's block norm is then sqrt(2) * max
  for (const char* text : {"qsgd(8)", "fp16", "bf16"}) {
    EXPECT_THROW(encodeOnce(Pipeline::parse(text), x), InvalidArgument) << text;
  }
  // Large but representable: int8 copes and decodes finite values.
  x[3] = 1e38f;
  x[4] = 1.0f;
  const auto y = roundTrip(Pipeline::parse("int8"), x);
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
  EXPECT_NEAR(y[3], 1e38f, 1e38f / 254);
}

}  // namespace
}  // namespace strait::core
