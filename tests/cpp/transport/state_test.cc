// State documents (transport/state.h): what joins and checkpoints carry.
// They round trip, and hostile bytes are refused with the sender named.

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "core/error.h"
#include "transport/state.h"

namespace strait::transport {
namespace {

struct Sample {
  std::vector<float> global{1.5f, -2.0f, 0.0f};
  std::vector<uint64_t> held{7, 0xabcdef, 9, 1};
  std::string extra = "optimizer state";
  State state() const {
    State s;
    s.counters = {{"syncs", 12}, {"round", 3}};
    s.strings = {{"status", "running"}, {"model", "f00d"}};
    s.sections = {{"global", SectionType::kFloat32, reinterpret_cast<const uint8_t*>(global.data()), global.size() * 4},
                  {"held", SectionType::kU64, reinterpret_cast<const uint8_t*>(held.data()), held.size() * 8},
                  {"extra", SectionType::kBytes, reinterpret_cast<const uint8_t*>(extra.data()), extra.size()}};
    return s;
  }
};

TEST(State, RoundTripsCountersStringsAndSections) {
  const Sample sample;
  const std::vector<uint8_t> bytes = encodeState(sample.state());
  const State s = decodeState(bytes.data(), bytes.size(), "site 'b' sent a join message");
  EXPECT_EQ(s.counter("syncs", "x"), 12u);
  EXPECT_EQ(s.string("status", "x"), "running");
  const StateSection& g = s.section("global", SectionType::kFloat32, "x", 3);
  EXPECT_EQ(std::memcmp(g.data, sample.global.data(), 12), 0);
  EXPECT_EQ(s.section("held", SectionType::kU64, "x").count(), 4u);
  const StateSection& e = s.section("extra", SectionType::kBytes, "x");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(e.data), e.size), sample.extra);
  EXPECT_TRUE(s.has("extra"));
  EXPECT_FALSE(s.has("momentum"));
  // Asking for what is not there (or not so) names it.
  try {
    s.section("global", SectionType::kFloat32, "the state sent by site 'b'", 4);
    FAIL();
  } catch (const ProtocolError& x) {
    EXPECT_STREQ(x.what(), "the state sent by site 'b': section 'global' holds 3 elements; expected 4");
  }
  EXPECT_THROW(s.section("momentum", SectionType::kFloat32, "x"), ProtocolError);
  EXPECT_THROW(s.section("extra", SectionType::kFloat32, "x"), ProtocolError);
  EXPECT_THROW(s.counter("nonce", "x"), ProtocolError);
}

TEST(State, EveryTruncationAndTrailingBytesAreRefusedNamingTheSender) {
  const std::vector<uint8_t> bytes = encodeState(Sample().state());
  for (size_t n = 0; n < bytes.size(); ++n) {
    try {
      decodeState(bytes.data(), n, "site 'b' sent a join message");
      FAIL() << "accepted " << n << " of " << bytes.size() << " bytes";
    } catch (const ProtocolError& e) {
      EXPECT_EQ(std::string(e.what()).rfind("site 'b' sent a join message", 0), 0u) << e.what();
    }
  }
  std::vector<uint8_t> longer = bytes;
  longer.push_back(1);
  EXPECT_THROW(decodeState(longer.data(), longer.size(), "x"), ProtocolError);
}

TEST(State, RaggedSectionsUnknownTypesAndHugeHeadersAreRefused) {
  Sample sample;
  State s = sample.state();
  s.sections[0].size = 5;  // not a whole number of float32
  std::vector<uint8_t> ragged = encodeState(s);
  EXPECT_THROW(decodeState(ragged.data(), ragged.size(), "x"), ProtocolError);
  std::vector<uint8_t> bytes = encodeState(sample.state());
  uint64_t huge = ~uint64_t{0};
  std::memcpy(bytes.data(), &huge, 8);
  EXPECT_THROW(decodeState(bytes.data(), bytes.size(), "x"), ProtocolError);
}

TEST(State, RandomCorruptionNeverCrashesAndNeverOverruns) {
  const std::vector<uint8_t> bytes = encodeState(Sample().state());
  std::mt19937 g(5);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<uint8_t> bad = bytes;
    for (int k = 0; k < 3; ++k) bad[g() % bad.size()] ^= uint8_t(1 + g() % 255);
    try {
      const State s = decodeState(bad.data(), bad.size(), "x");
      for (const StateSection& sec : s.sections) {
        EXPECT_GE(sec.data, bad.data());
        EXPECT_LE(sec.data + sec.size, bad.data() + bad.size());
      }
    } catch (const ProtocolError&) {
    }
  }
}

}  // namespace
}  // namespace strait::transport
