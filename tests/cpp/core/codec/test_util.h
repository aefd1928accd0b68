#pragma once
// Shared helpers for the codec tests: deterministic inputs and plain
// reference implementations to compare the optimised codecs against.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/codec/codec.h"
#include "core/error.h"

namespace strait::core::testing {

inline std::vector<float> gaussian(size_t n, uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Encodes with a fresh state and returns the payload.
inline std::vector<uint8_t> encodeOnce(const Pipeline& p, const std::vector<float>& x,
                                       uint64_t seed = 1, const TensorShape& shape = {}) {
  CodecState st(seed);
  std::vector<uint8_t> out;
  p.encode(x.data(), x.size(), shape, st, out);
  return out;
}

inline std::vector<float> decodeAll(const std::vector<uint8_t>& payload, size_t n) {
  std::vector<float> out(n, -12345.0f);
  decode(payload.data(), payload.size(), out.data(), n);
  return out;
}

inline std::vector<float> roundTrip(const Pipeline& p, const std::vector<float>& x,
                                    uint64_t seed = 1, const TensorShape& shape = {}) {
  return decodeAll(encodeOnce(p, x, seed, shape), x.size());
}

// Reference top-k: indices of the k largest |x|, ties to the lower index,
// returned in increasing order.
inline std::vector<size_t> referenceTopK(const std::vector<float>& x, size_t k) {
  std::vector<size_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

// FNV-1a over bytes: a stable digest for golden-payload tests.
inline uint64_t fnv1a(const std::vector<uint8_t>& bytes) {
  uint64_t h = 1469598103934665603ULL;
  for (uint8_t b : bytes) {
    h ^= b;
    h *= 1099511628211ULL;
  }
  return h;
}

// Every pipeline the suites sweep over.
inline std::vector<std::string> allPipelines() {
  return {"fp32",
          "fp16",
          "bf16",
          "int8",
          "int8(block=64, rounding=stochastic)",
          "int4",
          "int4(block=8, rounding=stochastic)",
          "int2",
          "int2(block=32, rounding=stochastic)",
          "qsgd",
          "qsgd(bits=8, block=64)",
          "qsgd(2)",
          "sign",
          "sign(block=8)",
          "topk(0.01)",
          "topk(0.1, method=radix) -> int8",
          "topk(0.01) -> int8",
          "topk(count=3) -> fp16",
          "topk(0.5) -> sign",
          "topk(0.05) -> int4(rounding=stochastic)",
          "randomk(0.1)",
          "randomk(0.02) -> int8",
          "randomk(count=5) -> bf16",
          "lowrank",
          "lowrank(rank=2) -> fp16",
          "lowrank(rank=1) -> int8",
          "lowrank(rank=8) -> qsgd(8)"};
}

// Sizes that include 0, 1 and counts that do not divide any block size.
inline std::vector<size_t> allSizes() { return {0, 1, 2, 7, 8, 63, 255, 256, 257, 1000, 4099}; }

}  // namespace strait::core::testing
