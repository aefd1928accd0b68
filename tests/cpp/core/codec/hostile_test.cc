// Decoders against hostile bytes: every truncation, thousands of random
// corruptions, and hand-made malicious payloads. A decoder either throws
// ProtocolError or produces finite values; decodeAccumulate never modifies
// its accumulator when it throws.

#include <cstring>
#include <random>

#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;

// Decodes into a sentinel accumulator. Returns true on success (then every
// output is finite); on ProtocolError checks the accumulator is untouched.
bool tryDecode(const std::vector<uint8_t>& payload, size_t n) {
  std::vector<float> acc(n, 0.25f);
  try {
    decodeAccumulate(payload.data(), payload.size(), acc.data(), n, 1.0f);
  } catch (const ProtocolError&) {
    for (float v : acc) EXPECT_EQ(v, 0.25f) << "accumulator modified by a rejected payload";
    return false;
  }
  for (float v : acc) EXPECT_TRUE(std::isfinite(v));
  std::vector<float> out(n);
  decode(payload.data(), payload.size(), out.data(), n);  // must agree: no throw
  for (float v : out) EXPECT_TRUE(std::isfinite(v));
  return true;
}

TEST(Hostile, EveryTruncationIsRejected) {
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    for (size_t n : {size_t{0}, size_t{1}, size_t{100}, size_t{1029}}) {
      const auto payload = encodeOnce(p, gaussian(n, n));
      ASSERT_TRUE(tryDecode(payload, n)) << text;
      for (size_t len = 0; len < payload.size(); ++len) {
        std::vector<uint8_t> cut(payload.begin(), payload.begin() + long(len));
        ASSERT_FALSE(tryDecode(cut, n)) << text << " n=" << n << " accepted a prefix of " << len;
      }
      auto longer = payload;
      longer.push_back(0);
      ASSERT_FALSE(tryDecode(longer, n)) << text << " accepted a trailing byte";
    }
  }
}

TEST(Hostile, RandomCorruptionsAreRejectedOrDecodeFinite) {
  std::mt19937_64 rng(2024);
  int rejected = 0, accepted = 0;
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    const size_t n = 777;
    const auto payload = encodeOnce(p, gaussian(n, 3));
    for (int trial = 0; trial < 150; ++trial) {
      auto bad = payload;
      const int flips = 1 + int(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        const size_t at = rng() % bad.size();
        bad[at] = (trial % 3 == 0) ? uint8_t(rng()) : uint8_t(bad[at] ^ (1u << (rng() % 8)));
      }
      (tryDecode(bad, n) ? accepted : rejected)++;
    }
  }
  // Both outcomes occur: flips in value bytes decode, flips in headers do not.
  EXPECT_GT(rejected, 200);
  EXPECT_GT(accepted, 200);
}

// Builders for hand-made payloads.
std::vector<uint8_t> header(uint8_t structure, uint64_t n, uint8_t version = 1) {
  std::vector<uint8_t> b = {'S', 'T', 'R', 'T', version, structure, 0, 0};
  for (int i = 0; i < 8; ++i) b.push_back(uint8_t(n >> (8 * i)));
  return b;
}
void put32(std::vector<uint8_t>& b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(uint8_t(v >> (8 * i)));
}
void put64(std::vector<uint8_t>& b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(uint8_t(v >> (8 * i)));
}
void putFloat(std::vector<uint8_t>& b, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  put32(b, u);
}
void valueHeader(std::vector<uint8_t>& b, uint8_t kind, uint8_t bits, uint32_t block) {
  b.insert(b.end(), {kind, bits, 0, 0});
  put32(b, block);
}

std::string rejection(const std::vector<uint8_t>& payload, size_t n) {
  std::vector<float> out(n);
  try {
    decode(payload.data(), payload.size(), out.data(), n);
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(Hostile, HandMadePayloadsNameTheirDefect) {
  struct Case {
    std::vector<uint8_t> bytes;
    size_t n;
    const char* expect;
  };
  std::vector<Case> cases;
  {  // bad magic
    auto b = header(0, 0);
    b[0] = 'X';
    valueHeader(b, 1, 32, 0);
    cases.push_back({b, 0, "bad magic"});
  }
  {  // future version
    auto b = header(0, 0, 9);
    cases.push_back({b, 0, "format version 9 is not supported"});
  }
  {  // unknown structure
    cases.push_back({header(7, 0), 0, "unknown structure id 7"});
  }
  {  // unknown value codec
    auto b = header(0, 1);
    valueHeader(b, 42, 8, 0);
    cases.push_back({b, 1, "unknown value codec id 42"});
  }
  {  // int8 with a NaN scale
    auto b = header(0, 8);
    valueHeader(b, 4, 8, 8);
    putFloat(b, std::numeric_limits<float>::quiet_NaN());
    for (int i = 0; i < 8; ++i) b.push_back(1);
    cases.push_back({b, 8, "scale"});
  }
  {  // int8 with a negative scale
    auto b = header(0, 8);
    valueHeader(b, 4, 8, 8);
    putFloat(b, -1.0f);
    for (int i = 0; i < 8; ++i) b.push_back(1);
    cases.push_back({b, 8, "scale -1"});
  }
  {  // int8 scale so large that 127 * scale overflows
    auto b = header(0, 8);
    valueHeader(b, 4, 8, 8);
    putFloat(b, 3e38f);
    for (int i = 0; i < 8; ++i) b.push_back(1);
    cases.push_back({b, 8, "finite top value"});
  }
  {  // int8 with the forbidden code -128
    auto b = header(0, 8);
    valueHeader(b, 4, 8, 8);
    putFloat(b, 1.0f);
    for (int i = 0; i < 8; ++i) b.push_back(i == 5 ? 0x80 : 1);
    cases.push_back({b, 8, "pattern -128 is not a valid code"});
  }
  {  // block size not a multiple of 8
    auto b = header(0, 8);
    valueHeader(b, 4, 8, 12);
    cases.push_back({b, 8, "block size 12"});
  }
  {  // fp16 Inf
    auto b = header(0, 1);
    valueHeader(b, 2, 16, 0);
    b.push_back(0x00);
    b.push_back(0x7c);
    cases.push_back({b, 1, "NaN or Inf"});
  }
  {  // fp32 NaN
    auto b = header(0, 1);
    valueHeader(b, 1, 32, 0);
    putFloat(b, std::numeric_limits<float>::quiet_NaN());
    cases.push_back({b, 1, "non-finite"});
  }
  {  // topk: k > n
    auto b = header(1, 4);
    put64(b, 5);
    cases.push_back({b, 4, "k = 5 exceeds the value count 4"});
  }
  {  // topk: index out of range (delta 9 with n = 4)
    auto b = header(1, 4);
    put64(b, 1);
    b.push_back(1);   // index format
    b.push_back(4);   // width 4
    b.push_back(9);   // delta 9
    valueHeader(b, 1, 32, 0);
    putFloat(b, 1.0f);
    cases.push_back({b, 4, "index 9 at position 0 is out of range for 4 values"});
  }
  {  // topk: width 40
    auto b = header(1, 4);
    put64(b, 1);
    b.push_back(1);
    b.push_back(40);
    cases.push_back({b, 4, "width 40 bits"});
  }
  {  // lowrank: view does not fit n
    auto b = header(3, 10);
    put32(b, 2);
    put32(b, 2);
    put32(b, 1);
    cases.push_back({b, 10, "view 2 x 2 does not fit 10 values"});
  }
  {  // lowrank: rank beyond the view
    auto b = header(3, 10);
    put32(b, 4);
    put32(b, 3);
    put32(b, 4);
    cases.push_back({b, 10, "rank 4 must be in [1, min(4, 3)]"});
  }
  {  // lowrank: huge claimed factors, few bytes
    auto b = header(3, 4000000000ULL);
    put32(b, 63246);
    put32(b, 63246);
    put32(b, 1024);
    valueHeader(b, 1, 32, 0);
    cases.push_back({b, 0, "holds 4000000000 values"});
  }
  {  // lowrank: factors whose product overflows
    auto b = header(3, 1);
    put32(b, 1);
    put32(b, 1);
    put32(b, 1);
    valueHeader(b, 1, 32, 0);
    putFloat(b, 3e38f);
    putFloat(b, 3e38f);
    cases.push_back({b, 1, "could overflow float32"});
  }
  {  // nonzero flags
    auto b = header(0, 0);
    b[6] = 1;
    cases.push_back({b, 0, "flags = 1"});
  }
  for (const Case& c : cases) {
    // n = 0 stands for "the caller's buffer does not match": decode with 0.
    const std::string msg = rejection(c.bytes, c.n > (size_t(1) << 30) ? 0 : c.n);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "expected \"" << c.expect << "\", got: " << msg;
  }
}

TEST(Hostile, HugeClaimsNeedMatchingDestinations) {
  // A header may claim any n; decoding needs a destination of exactly n, so
  // the caller's own limit (the transport's max message size) governs memory.
  auto b = header(0, 1ULL << 62);
  valueHeader(b, 1, 32, 0);
  const PayloadInfo info = inspectPayload(b.data(), b.size());
  EXPECT_EQ(info.n, 1ULL << 62);
  std::vector<float> out(16);
  EXPECT_THROW(decode(b.data(), b.size(), out.data(), out.size()), ProtocolError);
  // Sparse payloads beyond 2^32-1 values are refused outright.
  auto sparse = header(1, 1ULL << 40);
  put64(sparse, 1);
  try {
    inspectPayload(sparse.data(), sparse.size());
    FAIL() << "accepted";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the sparse limit"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace strait::core
