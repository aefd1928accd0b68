// Codec throughput on one thread: encode, decode and decode-accumulate of N
// float32 values for each pipeline, next to a plain memcpy of the buffer.
// Prints one JSON object (bench/codecs/run.py adds the PyTorch baseline and
// formats the table). Not a test: numbers vary with the machine.
//
//   strait_bench_codecs [--n N] [--reps R] [--only TEXT]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/codec/codec.h"
#include "core/codec/impl/simd.h"
#include "core/error.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Entry {
  const char* name;  // as in the config
  const char* text;  // pipeline text
};

// Codec names as the config spells them; pipelines by their text.
const Entry kEntries[] = {
    {"fp16", "fp16"},
    {"bf16", "bf16"},
    {"int8", "int8"},
    {"int8_stochastic", "int8(rounding=stochastic)"},
    {"int4", "int4"},
    {"int2", "int2"},
    {"qsgd", "qsgd"},
    {"sign", "sign"},
    {"topk", "topk(0.01)"},
    {"topk_radix", "topk(0.01, method=radix)"},
    {"randomk", "randomk(0.01)"},
    {"lowrank", "lowrank(rank=4)"},
    {"topk(0.01) -> int8", "topk(0.01) -> int8"},
    {"randomk(0.01) -> int8", "randomk(0.01) -> int8"},
    {"lowrank(4) -> fp16", "lowrank(rank=4) -> fp16"},
};

template <typename Fn>
double bestSeconds(int reps, Fn&& fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::min(best, s);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  size_t n = size_t{1} << 24;  // 16M values, 64 MiB
  int reps = 5;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--n" && i + 1 < argc) {
      n = std::stoull(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--n N] [--reps R] [--only NAME]\n", argv[0]);
      return 2;
    }
  }
  // Gradient-like data: Gaussian with a few large outliers.
  std::vector<float> x(n);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> dist(0.0f, 1e-3f);
  for (auto& v : x) v = dist(rng);
  for (size_t i = 0; i < n; i += 4099) x[i] *= 30.0f;

  const double bytes_in = 4.0 * static_cast<double>(n);
  std::vector<float> out(n, 0.0f);
  const double memcpy_s = bestSeconds(reps, [&] { std::memcpy(out.data(), x.data(), n * 4); });

  // lowrank sees the buffer as a square matrix, as a weight of that shape.
  const int64_t side = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  const strait::core::TensorShape square{{side, static_cast<int64_t>(n) / side}};

  std::printf("{\"n\": %zu, \"threads\": 1, \"simd\": \"%s\", \"memcpy_gbps\": %.3f, \"results\": [",
              n, strait::core::simd::pathName(), bytes_in / memcpy_s / 1e9);
  bool first = true;
  for (const Entry& e : kEntries) {
    if (!only.empty() && only != e.name) continue;
    const auto p = strait::core::Pipeline::parse(e.text);
    const bool lowrank = std::strncmp(e.text, "lowrank", 7) == 0;
    const strait::core::TensorShape shape = lowrank ? square : strait::core::TensorShape{};
    strait::core::CodecState state(7);
    std::vector<uint8_t> payload;
    payload.reserve(p.maxEncodedBytes(n));
    p.encode(x.data(), n, shape, state, payload);  // warm-up: sizes scratch buffers
    const double enc = bestSeconds(reps, [&] { p.encode(x.data(), n, shape, state, payload); });
    const double dec = bestSeconds(reps, [&] {
      strait::core::decode(payload.data(), payload.size(), out.data(), n);
    });
    const double acc = bestSeconds(reps, [&] {
      strait::core::decodeAccumulate(payload.data(), payload.size(), out.data(), n, 0.5f);
    });
    std::printf("%s\n  {\"codec\": \"%s\", \"pipeline\": \"%s\", \"encode_gbps\": %.3f, "
                "\"decode_gbps\": %.3f, \"decode_accumulate_gbps\": %.3f, \"bits_per_value\": %.4f, "
                "\"payload_bytes\": %zu}",
                first ? "" : ",", e.name, p.toString().c_str(), bytes_in / enc / 1e9,
                bytes_in / dec / 1e9, bytes_in / acc / 1e9,
                8.0 * static_cast<double>(payload.size()) / static_cast<double>(n), payload.size());
    std::fflush(stdout);
    first = false;
  }
  std::printf("\n]}\n");
  return 0;
}
