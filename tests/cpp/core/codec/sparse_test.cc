// topk and randomk: exact selection against a reference, ties, index coding,
// stratified random subsets.

#include <set>

#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;

std::vector<float> denseFrom(const std::vector<float>& x, const std::vector<size_t>& keep) {
  std::vector<float> y(x.size(), 0.0f);
  for (size_t i : keep) y[i] = x[i];
  return y;
}

class TopKExact : public ::testing::TestWithParam<const char*> {};

TEST_P(TopKExact, KeepsExactlyTheKLargestMagnitudes) {
  const std::string method = GetParam();
  // 300,000 values exercise the sampled threshold (it samples only above 262,144).
  for (size_t n : {size_t{0}, size_t{1}, size_t{2}, size_t{129}, size_t{1000}, size_t{300000}}) {
    for (double ratio : {0.001, 0.01, 0.3, 1.0}) {
      const auto x = gaussian(n, n + size_t(ratio * 1000));
      const Pipeline p = Pipeline::parse("topk(ratio=" + std::to_string(ratio) +
                                         ", method=" + method + ")");
      const size_t k = n == 0 ? 0 : std::min(n, std::max<size_t>(1, size_t(std::ceil(ratio * n))));
      const auto y = roundTrip(p, x);
      ASSERT_EQ(y, denseFrom(x, referenceTopK(x, k))) << "n=" << n << " ratio=" << ratio;
    }
  }
}

TEST_P(TopKExact, TiesGoToTheLowerIndex) {
  const std::string method = GetParam();
  // Magnitudes from a tiny set, signs mixed: most of the k-th magnitude's
  // values are ties, and +1 and -1 count as equal.
  for (size_t n : {size_t{50}, size_t{300000}}) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; ++i) {
      const int m = int((i * 7919) % 5);
      x[i] = float(m) * ((i % 3 == 0) ? -1.0f : 1.0f);
    }
    for (size_t k : {size_t{1}, n / 10, n / 5 + 3, n - 1}) {
      const Pipeline p = Pipeline::parse("topk(count=" + std::to_string(k) + ", method=" + method + ")");
      ASSERT_EQ(roundTrip(p, x), denseFrom(x, referenceTopK(x, k))) << "n=" << n << " k=" << k;
    }
  }
}

TEST_P(TopKExact, AllEqualAndAllZeroInputs) {
  const std::string method = GetParam();
  for (float v : {0.0f, 2.5f}) {
    std::vector<float> x(300000, v);
    const Pipeline p = Pipeline::parse("topk(0.01, method=" + method + ")");
    const auto y = roundTrip(p, x);
    EXPECT_EQ(y, denseFrom(x, referenceTopK(x, 3000)));
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, TopKExact, ::testing::Values("sample", "radix"));

TEST(TopK, CountLargerThanTensorKeepsEverything) {
  const auto x = gaussian(10, 3);
  EXPECT_EQ(roundTrip(Pipeline::parse("topk(count=50)"), x), x);
  EXPECT_EQ(roundTrip(Pipeline::parse("topk(1000)"), x), x);  // integer literal: a count
}

// k = ceil(ratio * n) of the decimal ratio written, not of its binary
// double: 0.07 * 100 is 7.000000000000001 in double arithmetic.
TEST(TopK, KIsTheCeilingOfRatioTimesNAsWritten) {
  struct Case {
    const char* ratio;
    size_t n, k;
  };
  for (const Case c : {Case{"0.07", 100, 7}, Case{"0.29", 100, 29}, Case{"0.57", 100, 57}, Case{"0.1", 30, 3},
                       Case{"0.07", 101, 8}, Case{"0.015", 1000, 15}, Case{"0.0001", 10, 1}, Case{"1.0", 13, 13}}) {
    for (const char* structure : {"topk", "randomk"}) {
      const auto x = gaussian(c.n, c.n);
      const auto y = roundTrip(Pipeline::parse(std::string(structure) + "(ratio=" + c.ratio + ")"), x);
      EXPECT_EQ(size_t(std::count_if(y.begin(), y.end(), [](float v) { return v != 0.0f; })), c.k)
          << structure << "(" << c.ratio << ") of " << c.n;
    }
  }
}

TEST(TopK, FarApartIndicesUseWideDeltas) {
  // Two spikes 10 million apart: the delta needs 24 bits.
  std::vector<float> x(10000001, 0.0f);
  x[0] = 5.0f;
  x[10000000] = -7.0f;
  const auto payload = encodeOnce(Pipeline::parse("topk(count=2)"), x);
  const auto y = decodeAll(payload, x.size());
  EXPECT_EQ(y[0], 5.0f);
  EXPECT_EQ(y[10000000], -7.0f);
  EXPECT_LT(payload.size(), 64u);
}

TEST(TopK, IndicesCostAboutLogOfTheGapBits) {
  // At 1% density the indices take about log2(100) + 1 bits each and the
  // int8 values 8 + 32/256: together well under 0.2 bits per input value.
  const size_t n = 1 << 20;
  const auto x = gaussian(n, 99);
  const auto payload = encodeOnce(Pipeline::parse("topk(0.01) -> int8"), x);
  const double bits_per_value = 8.0 * double(payload.size()) / double(n);
  EXPECT_LT(bits_per_value, 0.2) << payload.size() << " bytes";
  const auto fp32 = encodeOnce(Pipeline::parse("topk(0.01)"), x);
  const double index_bits = 8.0 * double(fp32.size() - 16 - 8 - 8 - 4 * 10486) / 10486;
  EXPECT_LT(index_bits, 10.0);
}

TEST(TopK, QuantisedValuesLandOnTheTopKPositions) {
  const auto x = gaussian(5000, 5);
  const auto y = roundTrip(Pipeline::parse("topk(0.02) -> int8"), x);
  const auto keep = referenceTopK(x, 100);
  std::set<size_t> kept(keep.begin(), keep.end());
  float amax = 0;
  for (size_t i : keep) amax = std::max(amax, std::fabs(x[i]));
  for (size_t i = 0; i < x.size(); ++i) {
    if (kept.count(i)) {
      EXPECT_NEAR(y[i], x[i], amax / 127 * 0.5f + 1e-6f);
    } else {
      EXPECT_EQ(y[i], 0.0f);
    }
  }
}

// chunk=C: every flat chunk of C values (the last one shorter) keeps its
// own ceil(ratio x length) largest magnitudes, ties to the lower index; the
// payload is an ordinary topk payload.
TEST(TopKChunks, EachChunkKeepsItsOwnLargestMagnitudes) {
  for (size_t n : {size_t{1}, size_t{64}, size_t{1000}, size_t{4096 * 3 + 17}}) {
    for (size_t chunk : {size_t{1}, size_t{7}, size_t{64}, size_t{4096}}) {
      for (double ratio : {0.01, 0.03125, 0.5}) {
        auto x = gaussian(n, n * 31 + chunk);
        // Scale some chunks up: a global top-k would take only those.
        for (size_t i = 0; i < n; ++i) x[i] *= (i / chunk) % 3 == 0 ? 1000.0f : 1.0f;
        const Pipeline p = Pipeline::parse("topk(" + std::to_string(ratio) + ", chunk=" + std::to_string(chunk) + ")");
        std::vector<size_t> keep;
        for (size_t at = 0; at < n; at += chunk) {
          const size_t len = std::min(chunk, n - at);
          const std::vector<float> part(x.begin() + long(at), x.begin() + long(at + len));
          const size_t k = std::min(len, std::max<size_t>(1, size_t(std::ceil(ratio * double(len) - 1e-9))));
          for (size_t i : referenceTopK(part, k)) keep.push_back(at + i);
        }
        ASSERT_EQ(roundTrip(p, x), denseFrom(x, keep)) << "n=" << n << " chunk=" << chunk << " ratio=" << ratio;
      }
    }
  }
}

TEST(TopKChunks, TiesGoToTheLowerIndexWithinAChunk) {
  std::vector<float> x(200, 1.0f);
  for (size_t i = 0; i < x.size(); i += 2) x[i] = -1.0f;
  const auto y = roundTrip(Pipeline::parse("topk(0.1, chunk=100)"), x);  // 10 of each 100
  for (size_t i = 0; i < y.size(); ++i) EXPECT_EQ(y[i], i % 100 < 10 ? x[i] : 0.0f) << i;
}

TEST(TopKChunks, TextRoundTripsAndMethodIsRefused) {
  EXPECT_EQ(Pipeline::parse("topk(0.03, chunk=4096) -> int2").toString(), "topk(ratio=0.03, chunk=4096) -> int2(block=256, rounding=nearest)");
  EXPECT_EQ(Pipeline::parse(Pipeline::parse("topk(0.03, chunk=4096)").toString()).toString(),
            "topk(ratio=0.03, chunk=4096) -> fp32");
  EXPECT_THROW(Pipeline::parse("topk(0.03, chunk=64, method=radix)"), ConfigError);
  EXPECT_THROW(Pipeline::parse("topk(0.03, chunk=-1)"), ConfigError);
}

TEST(TopKChunks, NonFiniteInputIsRefusedNamingTheIndex) {
  auto x = gaussian(1000, 5);
  x[777] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> out;
  CodecState st(1);
  try {
    Pipeline::parse("topk(0.01, chunk=100)").encode(x.data(), x.size(), TensorShape{}, st, out);
    FAIL() << "accepted a NaN";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("77"), std::string::npos) << e.what();
  }
}

TEST(RandomK, KeepsExactlyKDistinctValuesUnchanged) {
  for (size_t n : {size_t{1}, size_t{7}, size_t{1000}, size_t{100003}}) {
    for (double ratio : {0.01, 0.5, 1.0}) {
      auto x = gaussian(n, n);
      for (auto& v : x) v = std::fabs(v) + 1.0f;  // nonzero, so kept positions are visible
      const Pipeline p = Pipeline::parse("randomk(ratio=" + std::to_string(ratio) + ")");
      const auto y = roundTrip(p, x, 42);
      const size_t k = std::min(n, std::max<size_t>(1, size_t(std::ceil(ratio * n))));
      size_t kept = 0;
      for (size_t i = 0; i < n; ++i) {
        if (y[i] != 0.0f) {
          ++kept;
          ASSERT_EQ(y[i], x[i]);
        }
      }
      EXPECT_EQ(kept, k) << "n=" << n << " ratio=" << ratio;
    }
  }
}

TEST(RandomK, SubsetChangesEveryStepAndCoversPositionsUniformly) {
  const size_t n = 1000, steps = 2000;
  std::vector<float> x(n, 1.0f);
  const Pipeline p = Pipeline::parse("randomk(0.1)");
  CodecState st(7);
  std::vector<uint8_t> payload;
  std::vector<int> hits(n, 0);
  std::vector<float> y(n);
  std::vector<float> previous;
  for (size_t s = 0; s < steps; ++s) {
    p.encode(x.data(), n, st, payload);
    decode(payload.data(), payload.size(), y.data(), n);
    EXPECT_NE(y, previous);
    previous = y;
    for (size_t i = 0; i < n; ++i) hits[i] += y[i] != 0.0f;
  }
  // Each position is kept with probability 0.1: 200 expected hits, sd ~13.4.
  for (size_t i = 0; i < n; ++i) {
    EXPECT_GT(hits[i], 200 - 70) << i;
    EXPECT_LT(hits[i], 200 + 70) << i;
  }
}

TEST(RandomK, PayloadCarriesNoIndices) {
  const auto x = gaussian(100000, 1);
  const auto payload = encodeOnce(Pipeline::parse("randomk(0.01)"), x);
  EXPECT_EQ(payload.size(), 16u + 16u + 8u + 1000u * 4u);
}

}  // namespace
}  // namespace strait::core
