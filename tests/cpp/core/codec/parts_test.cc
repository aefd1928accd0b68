// Several payloads in one message (core/codec/parts.h): the framing round
// trips, and every malformed message is refused before any part is trusted.

#include <gtest/gtest.h>

#include <cstring>

#include "core/codec/parts.h"
#include "core/error.h"

namespace strait::core {
namespace {

std::vector<std::vector<uint8_t>> sample() { return {{1, 2, 3}, {}, {9}, std::vector<uint8_t>(1000, 7)}; }

TEST(Parts, RoundTripInOrderIncludingEmptyParts) {
  const auto parts = sample();
  const std::vector<uint8_t> message = frameParts(parts);
  EXPECT_EQ(message.size(), 8 * 5 + 3 + 0 + 1 + 1000);
  const auto views = splitParts(message.data(), message.size(), parts.size());
  ASSERT_EQ(views.size(), parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    EXPECT_EQ(std::vector<uint8_t>(views[i].data, views[i].data + views[i].size), parts[i]) << i;
  }
  const std::vector<uint8_t> none = frameParts({});
  EXPECT_TRUE(splitParts(none.data(), none.size(), 0).empty());
}

TEST(Parts, AnotherCountOrAnyTruncationOrTrailingByteIsRefused) {
  const std::vector<uint8_t> message = frameParts(sample());
  EXPECT_THROW(splitParts(message.data(), message.size(), 3), ProtocolError);
  EXPECT_THROW(splitParts(message.data(), message.size(), 5), ProtocolError);
  for (size_t n = 0; n < message.size(); ++n) {
    EXPECT_THROW(splitParts(message.data(), n, 4), ProtocolError) << "truncated to " << n;
  }
  std::vector<uint8_t> longer = message;
  longer.push_back(0);
  try {
    splitParts(longer.data(), longer.size(), 4);
    FAIL() << "a trailing byte was accepted";
  } catch (const ProtocolError& e) {
    EXPECT_STREQ(e.what(), "a message whose framing does not match 4 parts (1045 bytes)");
  }
}

TEST(Parts, LengthsThatOverrunOrOverflowAreRefused) {
  std::vector<uint8_t> message = frameParts(sample());
  const uint64_t huge[] = {~uint64_t{0}, uint64_t{1} << 63, 1004, 1005};
  for (uint64_t h : huge) {
    std::vector<uint8_t> bad = message;
    std::memcpy(bad.data() + 8, &h, 8);  // the first part's length
    EXPECT_THROW(splitParts(bad.data(), bad.size(), 4), ProtocolError) << h;
  }
  // Two lengths that sum to the right total only modulo 2^64.
  std::vector<uint8_t> wrap = message;
  const uint64_t a = ~uint64_t{0}, b = 1004 + 1;
  std::memcpy(wrap.data() + 8, &a, 8);
  std::memcpy(wrap.data() + 16, &b, 8);
  EXPECT_THROW(splitParts(wrap.data(), wrap.size(), 4), ProtocolError);
  const uint64_t count = uint64_t{1} << 61;  // a count whose header could not fit
  std::memcpy(message.data(), &count, 8);
  EXPECT_THROW(splitParts(message.data(), message.size(), size_t(count)), ProtocolError);
}

}  // namespace
}  // namespace strait::core
