// Adaptive compression's controller (core/codec/adaptive.h): its decisions
// on given measurements, deterministic.

#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "core/codec/adaptive.h"
#include "core/error.h"

namespace strait::core {
namespace {

TEST(Adaptive, LevelsGoFromMostToFewestBytesAndRespectTheFloor) {
  AdaptiveCompression a(0.01, 0.08, 4);
  EXPECT_EQ(a.pipeline(), "topk(0.08) -> int8");  // starts with the most bytes
  std::set<double> densities;
  std::set<int> bits;
  double last = 1e9;
  for (const auto& [d, b] : a.levels()) {
    densities.insert(d);
    bits.insert(b);
    const double cost = d * (b + std::log2(1 / d) + 2);
    EXPECT_LE(cost, last);
    last = cost;
  }
  EXPECT_EQ(densities, (std::set<double>{0.08, 0.04, 0.02, 0.01}));
  EXPECT_EQ(bits, (std::set<int>{8, 4}));  // never below min_bits
}

TEST(Adaptive, ASlowExchangeMakesItSparserDownToTheFloorAndAFastOneDenser) {
  AdaptiveCompression a(0.01, 0.08, 4);
  a.update(0.010, 0.050);  // the latency floor: 10 ms
  std::vector<std::optional<std::string>> notes;
  for (int i = 0; i < 40; ++i) notes.push_back(a.update(0.050, 0.050));  // 40 ms beyond latency vs 50 ms compute
  EXPECT_EQ(a.pipeline(), "topk(0.01) -> int4");  // the floor, and it stays there
  EXPECT_FALSE(notes[0] || notes[1]);             // it waits for `patience` (3) steps of evidence
  size_t changes = 0;
  for (const auto& n : notes) changes += n.has_value();
  ASSERT_TRUE(notes[2].has_value());
  EXPECT_EQ(notes[2]->rfind("topk(0.08) -> int8 -> ", 0), 0u) << *notes[2];
  EXPECT_NE(notes[2]->find("more than a tenth"), std::string::npos) << *notes[2];
  EXPECT_EQ(changes, a.levels().size() - 1);
  EXPECT_FALSE(notes.back().has_value());
  for (int i = 0; i < 40; ++i) a.update(0.010, 0.050);  // nothing beyond latency: send more again
  EXPECT_EQ(a.pipeline(), "topk(0.08) -> int8");
}

TEST(Adaptive, AlternatingEvidenceDoesNotMakeItFlip) {
  AdaptiveCompression a(0.01, 0.08);
  a.update(0.010, 0.050);
  for (int k = 0; k < 30; ++k) EXPECT_FALSE(a.update(k % 2 ? 0.050 : 0.010, 0.050).has_value());
}

TEST(Adaptive, BetweenTheThresholdsItHolds) {
  AdaptiveCompression a(0.01, 0.08);
  a.update(0.010, 0.100);
  a.setLevel(2);
  EXPECT_FALSE(a.update(0.015, 0.100).has_value());  // 5 ms beyond latency: between 2.5 and 10 ms
  EXPECT_EQ(a.level(), 2u);
}

TEST(Adaptive, BadSettingsAreRefused) {
  EXPECT_THROW(AdaptiveCompression(0.5, 0.1), InvalidArgument);
  EXPECT_THROW(AdaptiveCompression(0.01, 0.1, 3), InvalidArgument);
}

}  // namespace
}  // namespace strait::core
