// The device kernels' arithmetic, run on the CPU. torch_ext/csrc/cuda/codecs.cu
// runs one warp per codec block (one thread per group of 8 values for the
// float kinds and for every decode), each lane calling core/codec/impl/lanes.h.
// Here the same launch is walked lane by lane on the host, with the warp's
// reductions (largest magnitude; the four partial sums) done by loops, and
// the bytes and bits must be those of the CPU codecs: every dense value
// stage, odd sizes, partial last groups, denormal and zero blocks, stochastic
// rounding, the golden inputs. What is left to a GPU is the launch itself
// (./strait gpu-check compares a GPU's payloads with the CPU's).

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/codec/codec.h"
#include "core/codec/impl/lanes.h"
#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

namespace L = lanes;
using testing::encodeOnce;
using testing::fnv1a;
using testing::gaussian;

// What the encode kernels write, as a section body: scales, then codes.
// Returns false where a kernel would report a refused block or group.
template <int Bits, bool Stochastic, bool L2>
bool emulateBlocks(const ValueStageSpec& spec, const float* x, uint64_t n, uint64_t seed, uint8_t* scales,
                   uint8_t* codes) {
  constexpr bool kSign = Bits == 1;
  const uint64_t nblocks = (n + spec.block - 1) / spec.block;
  bool ok = true;
  for (uint64_t b = 0; b < nblocks; ++b) {  // one warp each
    const float* xb = x + b * spec.block;
    const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(spec.block, n - b * spec.block));
    uint32_t m = 0;
    for (uint32_t lane = 0; lane < L::kLanes; ++lane) m = std::max(m, L::laneAbsMax(xb, len, lane));
    double sum = 0;
    if (L2 || kSign) {
      double p[4];
      for (uint32_t lane = 0; lane < 4; ++lane) p[lane] = L::partialSum<!kSign>(xb, len, lane);
      sum = L::combineSums(p[0], p[1], p[2], p[3]);
    }
    const L::BlockScale s = L::blockScale<Bits, L2>(m, sum, len);
    std::memcpy(scales + 4 * b, &s.scale, 4);
    if (s.mode >= L::kScaleNonFinite) {
      ok = false;
      continue;
    }
    const uint32_t key = Stochastic ? random::blockKey(seed, b) : 0;
    uint8_t* cb = codes + b * spec.block * Bits / 8;
    for (uint32_t lane = 0; lane < L::kLanes; ++lane) {
      for (uint32_t j0 = lane * L::kGroup; j0 < len; j0 += L::kStride) {
        uint64_t packed;
        if constexpr (kSign) {
          packed = L::signGroup(xb, j0, len);
        } else {
          packed = L::intGroup<Bits, Stochastic>(xb, j0, len, s, key);
        }
        const uint32_t bytes = L::groupBytes<Bits>(j0, len);
        for (uint32_t k = 0; k < bytes; ++k) cb[j0 * Bits / 8 + k] = static_cast<uint8_t>(packed >> (8 * k));
      }
    }
  }
  return ok;
}

bool emulateFloats(const ValueStageSpec& spec, const float* x, uint64_t n, uint8_t* out) {
  bool ok = true;
  const uint32_t width = spec.bits / 8;
  for (uint64_t i0 = 0; i0 < n; i0 += L::kGroup) {  // one thread each
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(L::kGroup, n - i0));
    if (L::laneAbsMax(x + i0, valid, 0) >= spec.limit) ok = false;
    uint8_t buf[32];
    L::floatGroup(spec.kind, x, i0, n, buf);
    std::memcpy(out + i0 * width, buf, valid * width);
  }
  return ok;
}

// The whole payload a device would produce for x, or an empty vector where
// it would report a refused value. The pipeline must be dense.
std::vector<uint8_t> emulateEncode(const Pipeline& p, const std::vector<float>& x, uint64_t state_seed) {
  CodecState st(state_seed);
  const std::optional<DeviceEncodePlan> plan = p.planDeviceEncode(x.size(), st);
  EXPECT_TRUE(plan.has_value());
  const ValueStageSpec& spec = plan->values;
  std::vector<uint8_t> out = plan->header;
  const size_t at = out.size();
  out.resize(at + plan->body_bytes);
  uint8_t* scales = out.data() + at;
  uint8_t* codes = scales + L::scaleBytes(spec, x.size());
  EXPECT_EQ(L::scaleBytes(spec, x.size()) + L::codeBytes(spec, x.size()), plan->body_bytes);
  bool ok = false;
  const uint64_t n = x.size();
  switch (spec.kind) {
    case L::kFp32:
    case L::kFp16:
    case L::kBf16:
      ok = emulateFloats(spec, x.data(), n, codes);
      break;
    case L::kSign:
      ok = emulateBlocks<1, false, false>(spec, x.data(), n, plan->seed, scales, codes);
      break;
    default:
#define STRAIT_CASE(B)                                                                                  \
  if (spec.bits == B) {                                                                                 \
    if (spec.l2) ok = emulateBlocks<B, true, true>(spec, x.data(), n, plan->seed, scales, codes);       \
    else if (spec.stochastic) ok = emulateBlocks<B, true, false>(spec, x.data(), n, plan->seed, scales, codes); \
    else ok = emulateBlocks<B, false, false>(spec, x.data(), n, plan->seed, scales, codes);            \
  }
      STRAIT_CASE(8)
      STRAIT_CASE(4)
      STRAIT_CASE(2)
#undef STRAIT_CASE
  }
  return ok ? out : std::vector<uint8_t>{};
}

// What the decode kernel gives: out = v (zero-filled first for top-k), or
// out += weight * v.
std::vector<float> emulateDecode(const std::vector<uint8_t>& payload, std::vector<float> out, float weight,
                                 bool accumulate) {
  const std::optional<DeviceDecodePlan> plan = planDeviceDecode(payload.data(), payload.size(), out.size());
  EXPECT_TRUE(plan.has_value());
  const uint8_t* scales = payload.data() + plan->body_offset;
  const uint8_t* data = scales + L::scaleBytes(plan->values, plan->count);
  if (!plan->dense && !accumulate) std::fill(out.begin(), out.end(), 0.0f);
  for (uint64_t i0 = 0; i0 < plan->count; i0 += L::kGroup) {  // one thread each
    float v[L::kGroup];
    const uint32_t valid = L::decodeGroup(plan->values, scales, data, i0, plan->count, v);
    for (uint32_t l = 0; l < valid; ++l) {
      const uint64_t at = plan->dense ? i0 + l : plan->indices[i0 + l];
      L::store(&out[at], v[l], weight, accumulate);
    }
  }
  return out;
}

std::vector<uint32_t> bitsOf(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// Every dense stage the suites sweep (test_util.h), and blocks at the
// extremes (the smallest, the largest, one not a power of two).
std::vector<std::string> denseStages() {
  std::vector<std::string> out;
  for (const std::string& text : testing::allPipelines()) {
    if (!Pipeline::parse(text).sparse()) out.push_back(text);
  }
  for (const char* extra : {"int8(block=8)", "int4(block=65536)", "sign(block=1000)"}) out.push_back(extra);
  return out;
}

// Inputs that reach every branch: partial groups and blocks, zero blocks,
// denormal ("tiny") blocks, outliers.
std::vector<std::vector<float>> inputs() {
  std::vector<std::vector<float>> out;
  for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{255}, size_t{257}, size_t{4099}}) {
    out.push_back(gaussian(n, n));
  }
  std::vector<float> mixed = gaussian(70001, 3);
  for (size_t i = 0; i < mixed.size(); i += 97) mixed[i] *= 40.0f;
  for (size_t i = 1000; i < 1600; ++i) mixed[i] = 0.0f;                        // zero blocks
  for (size_t i = 2048; i < 3000; ++i) mixed[i] *= 1e-40f;                      // denormals
  for (size_t i = 5000; i < 5100; ++i) mixed[i] = (i % 2 ? -1.0f : 1.0f) * 1e-45f;  // the smallest
  out.push_back(mixed);
  return out;
}

TEST(DeviceLanes, EncodeGivesTheCpuEncodersBytesForEveryDenseStage) {
  for (const std::string& text : denseStages()) {
    const Pipeline p = Pipeline::parse(text);
    for (const auto& x : inputs()) {
      const auto cpu = encodeOnce(p, x, 41);
      const auto lanes = emulateEncode(p, x, 41);
      ASSERT_EQ(lanes.size(), cpu.size()) << text << " n=" << x.size();
      EXPECT_TRUE(lanes == cpu) << text << " n=" << x.size();
    }
  }
}

TEST(DeviceLanes, EncodeMatchesTheGoldenPayloadDigests) {
  // The golden test's input and state seed (pipeline_test.cc).
  std::vector<float> x = gaussian(3001, 2026);
  for (size_t i = 0; i < x.size(); i += 97) x[i] *= 40.0f;
  struct Golden {
    const char* text;
    uint64_t digest;
  };
  const Golden golden[] = {
#include "tests/cpp/core/codec/golden_digests.inc"
  };
  int dense = 0;
  for (const Golden& g : golden) {
    const Pipeline p = Pipeline::parse(g.text);
    if (p.sparse()) continue;
    ++dense;
    EXPECT_EQ(fnv1a(emulateEncode(p, x, 99)), g.digest) << g.text;
  }
  EXPECT_GE(dense, 14);
}

TEST(DeviceLanes, RefusesWhatTheCpuEncoderRefuses) {
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* text;
    float value;
  };
  const Case cases[] = {{"fp32", inf},  {"fp16", 70000.0f}, {"bf16", std::nanf("")}, {"int8", -inf},
                        {"qsgd", inf},  {"sign", std::nanf("")},
                        {"qsgd(8)", std::numeric_limits<float>::max()}};  // the norm's scale * 127 overflows
  for (const Case& c : cases) {
    std::vector<float> x = gaussian(1000, 5);
    x[613] = c.value;
    x[614] = c.value;
    const Pipeline p = Pipeline::parse(c.text);
    EXPECT_THROW(encodeOnce(p, x), InvalidArgument) << c.text;
    EXPECT_TRUE(emulateEncode(p, x, 1).empty()) << c.text << ": the kernel must report it";
  }
}

TEST(DeviceLanes, DecodeAndAccumulateGiveTheCpuDecodersBits) {
  std::vector<std::string> texts = denseStages();
  for (const char* sparse : {"topk(0.01)", "topk(0.1) -> int4", "topk(0.03, chunk=512) -> int2", "topk(0.5) -> sign",
                             "topk(count=3) -> fp16"}) {
    texts.push_back(sparse);
  }
  for (const std::string& text : texts) {
    const Pipeline p = Pipeline::parse(text);
    for (const auto& x : inputs()) {
      const auto payload = encodeOnce(p, x, 7);
      std::vector<float> cpu(x.size(), -3.0f);
      decode(payload.data(), payload.size(), cpu.data(), cpu.size());
      EXPECT_EQ(bitsOf(emulateDecode(payload, std::vector<float>(x.size(), -3.0f), 1.0f, false)), bitsOf(cpu))
          << text << " n=" << x.size();
      std::vector<float> acc = gaussian(x.size(), 99);
      const std::vector<float> start = acc;
      decodeAccumulate(payload.data(), payload.size(), acc.data(), acc.size(), 0.37f);
      EXPECT_EQ(bitsOf(emulateDecode(payload, start, 0.37f, true)), bitsOf(acc)) << text << " n=" << x.size();
    }
  }
}

TEST(DeviceLanes, DevicePlansOnlyWhatTheDeviceRuns) {
  CodecState st(3);
  EXPECT_FALSE(Pipeline::parse("topk(0.01) -> int8").planDeviceEncode(100, st).has_value());
  EXPECT_EQ(st.encodeCount(), 0u) << "a refused plan must not draw a seed";
  const auto x = gaussian(1000, 1);
  for (const char* host_only : {"randomk(0.1)", "lowrank(rank=2)"}) {
    const auto payload = encodeOnce(Pipeline::parse(host_only), x, 1, TensorShape{{20, 50}});
    EXPECT_FALSE(planDeviceDecode(payload.data(), payload.size(), x.size()).has_value()) << host_only;
  }
  // A plan validates as decode() does: a corrupted code is refused up front.
  auto payload = encodeOnce(Pipeline::parse("int8"), x);
  payload.back() = 0x80;  // the one forbidden int8 code
  EXPECT_THROW(planDeviceDecode(payload.data(), payload.size(), x.size()), ProtocolError);
  EXPECT_THROW(planDeviceDecode(payload.data(), payload.size(), x.size() + 1), ProtocolError);
}

}  // namespace
}  // namespace strait::core
