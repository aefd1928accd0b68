// Pipeline text, canonical form, size bounds, decode-accumulate, determinism
// and the golden payloads that pin the wire format.

#include <cstdlib>

#include "core/codec/impl/simd.h"
#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;

std::string parseError(const std::string& text) {
  try {
    Pipeline::parse(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(PipelineText, CanonicalFormRoundTrips) {
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    const std::string canon = p.toString();
    EXPECT_EQ(Pipeline::parse(canon).toString(), canon) << text;
  }
  EXPECT_EQ(Pipeline::parse("topk(0.01)->int8").toString(),
            "topk(ratio=0.01, method=sample) -> int8(block=256, rounding=nearest)");
  EXPECT_EQ(Pipeline::parse(" lowrank ( rank = 2 ) -> fp16 ").toString(), "lowrank(rank=2) -> fp16");
  EXPECT_EQ(Pipeline::parse("topk(500)").toString(), "topk(count=500, method=sample) -> fp32");
  EXPECT_EQ(Pipeline::parse("qsgd(2)").toString(), "qsgd(block=512, bits=2)");
  EXPECT_EQ(Pipeline().toString(), "fp32");
}

TEST(PipelineText, ErrorsSayWhereAndWhatIsAllowed) {
  struct Case {
    const char* text;
    const char* expect;
  };
  const Case cases[] = {
      {"", "empty pipeline"},
      {"int9", "unknown stage 'int9'; known stages: topk, randomk, lowrank, fp32"},
      {"topk(0.01) -> randomk(0.1)", "column 15: 'randomk' after 'topk"},
      {"int8 -> topk(0.1)", "must come before the value codec"},
      {"fp16 -> int8", "a second value codec 'int8'"},
      {"topk(1.5)", "ratio = 1.5: must be a fraction in (0, 1]"},
      {"topk(0)", "count = 0: must be an integer in [1,"},
      {"topk(ratio=0)", "ratio = 0: must be a fraction in (0, 1]"},
      {"topk(ratio=0.1, count=5)", "one or the other"},
      {"topk(method=fast)", "method = fast: must be sample or radix"},
      {"int8(block=7)", "block = 7: must be an integer in [8, 65536]"},
      {"int8(block=12)", "block = 12: must be a multiple of 8"},
      {"int4(rounding=up)", "rounding = up: must be nearest or stochastic"},
      {"qsgd(bits=3)", "bits = 3: must be 2, 4 or 8"},
      {"lowrank(rank=0)", "rank = 0: must be an integer in [1, 1024]"},
      {"int8(blok=64)", "unknown argument 'blok'"},
      {"fp16(3)", "unexpected argument '3'"},
      {"int8(block=64, block=128)", "given twice"},
      {"topk(0.01) int8", "expected '->' between stages"},
      {"topk(0.01", "expected ',' or ')'"},
      {"topk(ratio=)", "expected a value after 'ratio='"},
      {"int8(block=64, 3)", "positional argument after key=value"},
  };
  for (const Case& c : cases) {
    const std::string msg = parseError(c.text);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "text: " << c.text << "\nmessage: " << msg;
    EXPECT_NE(msg.find("column"), std::string::npos) << msg;
  }
}

TEST(PipelineSize, MaxEncodedBytesBoundsEveryPayload) {
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    for (size_t n : allSizes()) {
      const auto x = gaussian(n, n + 5);
      for (const TensorShape& shape : {TensorShape{}, TensorShape{{int64_t(n), 1}}}) {
        const auto payload = encodeOnce(p, x, 1, shape);
        EXPECT_LE(payload.size(), p.maxEncodedBytes(n)) << text << " n=" << n;
        if (!p.sparse()) {
          EXPECT_EQ(payload.size(), p.maxEncodedBytes(n)) << text;
        }
      }
    }
  }
}

TEST(PipelineDecode, AccumulateEqualsDecodeThenAdd) {
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    for (size_t n : {size_t{0}, size_t{1}, size_t{257}, size_t{4099}}) {
      const auto x = gaussian(n, n + 9);
      const auto payload = encodeOnce(p, x);
      const auto decoded = decodeAll(payload, n);
      auto acc = gaussian(n, 1234);
      std::vector<float> expect(n);
      for (size_t i = 0; i < n; ++i) expect[i] = acc[i] + 0.375f * decoded[i];
      decodeAccumulate(payload.data(), payload.size(), acc.data(), n, 0.375f);
      for (size_t i = 0; i < n; ++i) {
        if (p.toString().rfind("lowrank", 0) == 0) {
          // Eigen's product may round its alpha-scaled accumulate differently.
          ASSERT_NEAR(acc[i], expect[i], 1e-5f * (1 + std::fabs(expect[i]))) << text;
        } else {
          ASSERT_EQ(acc[i], expect[i]) << text << " n=" << n << " i=" << i;
        }
      }
    }
  }
}

TEST(PipelineDecode, InspectReportsTheHeader) {
  const auto x = gaussian(1000, 1);
  PayloadInfo info = [&] {
    const auto payload = encodeOnce(Pipeline::parse("topk(0.1) -> int4"), x);
    return inspectPayload(payload.data(), payload.size());
  }();
  EXPECT_EQ(info.version, 1);
  EXPECT_EQ(info.n, 1000u);
  EXPECT_EQ(info.structure, "topk");
  EXPECT_EQ(info.values, "int4");
  EXPECT_EQ(info.bits, 4);
  const auto lr = encodeOnce(Pipeline::parse("lowrank -> bf16"), x);
  info = inspectPayload(lr.data(), lr.size());
  EXPECT_EQ(info.structure, "lowrank");
  EXPECT_EQ(info.values, "bf16");
}

TEST(PipelineDecode, WrongDestinationSizeIsRefused) {
  const auto x = gaussian(100, 1);
  const auto payload = encodeOnce(Pipeline::parse("int8"), x);
  std::vector<float> out(99);
  EXPECT_THROW(decode(payload.data(), payload.size(), out.data(), out.size()), ProtocolError);
}

TEST(PipelineEncode, SameSeedSameBytesAndStatesAdvance) {
  const auto x = gaussian(5000, 2);
  for (const std::string& text : allPipelines()) {
    const Pipeline p = Pipeline::parse(text);
    EXPECT_EQ(encodeOnce(p, x, 17), encodeOnce(p, x, 17)) << text;
  }
  const Pipeline p = Pipeline::parse("int8(rounding=stochastic)");
  CodecState st(17);
  std::vector<uint8_t> a, b;
  p.encode(x.data(), x.size(), st, a);
  p.encode(x.data(), x.size(), st, b);
  EXPECT_NE(a, b) << "each encode draws fresh rounding noise";
}

// Golden digests pin the wire format and prove that the AVX2 and baseline
// paths produce identical bytes: ctest runs this binary a second time with
// STRAIT_SIMD=generic against the same constants. A deliberate format change
// updates them (and bumps the format version, docs/PROTOCOL.md).
TEST(PipelineEncode, GoldenPayloadDigests) {
  std::vector<float> x = gaussian(3001, 2026);
  for (size_t i = 0; i < x.size(); i += 97) x[i] *= 40.0f;  // outliers
  struct Golden {
    const char* text;
    uint64_t digest;
  };
  const Golden golden[] = {
#include "tests/cpp/core/codec/golden_digests.inc"
  };
  const bool print = std::getenv("STRAIT_PRINT_GOLDEN") != nullptr;
  for (const Golden& g : golden) {
    const auto payload = encodeOnce(Pipeline::parse(g.text), x, 99, TensorShape{{3001}});
    const uint64_t d = fnv1a(payload);
    if (print) std::printf("    {\"%s\", 0x%016llxULL},\n", g.text, static_cast<unsigned long long>(d));
    EXPECT_EQ(d, g.digest) << g.text << " on the " << simd::pathName() << " path";
  }
}

}  // namespace
}  // namespace strait::core
