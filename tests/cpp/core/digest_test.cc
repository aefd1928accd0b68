// The parameters' digest (core/digest.h): a sum over elements, so any split
// digests alike, and any change of one element changes it.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "core/digest.h"

namespace strait::core {
namespace {

std::vector<float> values(size_t n, uint32_t seed = 1) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

TEST(Digest, ASplitIntoSlicesDigestsLikeTheWhole) {
  const std::vector<float> v = values(10007);
  const uint64_t whole = digestSum(v.data(), v.size());
  for (size_t cut : {size_t(0), size_t(1), size_t(4096), size_t(10006), size_t(10007)}) {
    EXPECT_EQ(digestSum(v.data(), cut) + digestSum(v.data() + cut, v.size() - cut, cut), whole) << cut;
  }
}

TEST(Digest, AnyChangeOfOneElementChangesIt) {
  std::vector<float> v = values(1000);
  const uint64_t before = digestSum(v.data(), v.size());
  for (size_t i : {size_t(0), size_t(500), size_t(999)}) {
    for (float x : {0.0f, -0.0f, 1e-45f, std::nextafter(v[i], 10.0f), std::numeric_limits<float>::max()}) {
      std::vector<float> w = v;
      if (std::memcmp(&w[i], &x, 4) == 0) continue;
      w[i] = x;
      EXPECT_NE(digestSum(w.data(), w.size()), before) << i << " " << x;
    }
  }
  std::vector<float> swapped = v;
  std::swap(swapped[3], swapped[4]);  // the same values elsewhere: another digest
  EXPECT_NE(digestSum(swapped.data(), swapped.size()), before);
}

// The format is part of the protocol (checkpoint names, the DiLoCo base
// digest every site compares): these numbers must never change.
TEST(Digest, KnownValues) {
  EXPECT_EQ(digestSum(nullptr, 0), 0u);
  const float one[] = {1.0f};
  EXPECT_EQ(digestHex(digestSum(one, 1)), digestHex(random::mix64(0x3f800000u)));
  const float ramp[] = {0.0f, 1.0f, 2.0f, 3.0f};
  uint64_t expect = 0;
  for (uint64_t i = 0; i < 4; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &ramp[i], 4);
    expect += random::mix64(bits + i * 0x9e3779b97f4a7c15ULL);
  }
  EXPECT_EQ(digestSum(ramp, 4), expect);
  EXPECT_EQ(digestHex(0x0123456789abcdefULL), "0123456789abcdef");
  EXPECT_EQ(digestHex(digestSum(ramp, 4)), "4697fce7cbea2f13");
}

}  // namespace
}  // namespace strait::core
