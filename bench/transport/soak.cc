// strait_bench_soak: many rounds between three gateways in one process
// (CurveZMQ on loopback), reporting resident memory as it goes, to show that
// nothing grows per round. A benchmark, not a test: `./strait bench soak`.
//
//   strait_bench_soak [--rounds N] [--bytes B] [--json]

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "tests/cpp/transport/transport_test_util.h"

namespace {

// Resident set size in KiB, from /proc/self/status.
long rssKib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace strait::transport;
  using namespace strait::transport::testing;
  uint64_t rounds = 1000;
  size_t bytes = 256 * 1024;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--rounds") && i + 1 < argc) {
      rounds = std::strtoull(argv[++i], nullptr, 10);
    } else if (!std::strcmp(argv[i], "--bytes") && i + 1 < argc) {
      bytes = std::strtoull(argv[++i], nullptr, 10);
    } else if (!std::strcmp(argv[i], "--json")) {
      json = true;
    } else {
      std::fprintf(stderr, "usage: strait_bench_soak [--rounds N] [--bytes B] [--json]\n");
      return 2;
    }
  }
  Job job = makeJob(3, false, 64 * 1024);
  for (auto& o : job.sites) {
    o.heartbeat = std::chrono::milliseconds(200);
    o.peer_timeout = std::chrono::milliseconds(5000);
  }
  std::vector<std::unique_ptr<Gateway>> g;
  for (auto& o : job.sites) g.push_back(std::make_unique<Gateway>(o));
  std::vector<std::pair<uint64_t, long>> samples;
  const auto start = std::chrono::steady_clock::now();
  long warm = 0;
  for (uint64_t r = 0; r < rounds; ++r) {
    std::vector<std::future<RoundResult>> f;
    for (size_t s = 0; s < g.size(); ++s) f.push_back(g[s]->exchange(r, "soak", payloadFor(s, r, bytes)));
    for (size_t s = 0; s < g.size(); ++s) {
      RoundResult res = getWithin(f[s]);
      for (size_t k = 0; k < res.payloads.size(); ++k) {
        if (!res.payloads[k] || !isPayloadOf(*res.payloads[k], k, r, bytes)) {
          std::fprintf(stderr, "soak: round %llu: wrong payload from site %zu\n", (unsigned long long)r, k);
          return 1;
        }
        g[s]->recycle(std::move(*res.payloads[k]));
      }
    }
    if (r == 9) warm = rssKib();
    if (r % 100 == 99 || r + 1 == rounds) {
      samples.emplace_back(r + 1, rssKib());
      if (!json) {
        std::fprintf(stderr, "\r  round %llu/%llu, resident %ld KiB", (unsigned long long)(r + 1),
                     (unsigned long long)rounds, samples.back().second);
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const long end = samples.back().second;
  // Growth in the steady state: from the first sample past a tenth of the
  // run (buffer pools and allocator arenas have filled by then) to the end.
  std::pair<uint64_t, long> from = samples.front();
  for (const auto& s : samples) {
    if (s.first >= rounds / 10) {
      from = s;
      break;
    }
  }
  const double per_round = rounds > from.first ? double(end - from.second) / double(rounds - from.first) : 0;
  if (json) {
    std::printf("{\"gateways\": 3, \"rounds\": %llu, \"payload_bytes\": %zu, \"seconds\": %.3f, "
                "\"rss_kib_after_10_rounds\": %ld, \"rss_kib_end\": %ld, \"steady_from_round\": %llu, "
                "\"growth_kib_per_round\": %.4f, \"samples\": [",
                (unsigned long long)rounds, bytes, secs, warm, end, (unsigned long long)from.first, per_round);
    for (size_t i = 0; i < samples.size(); ++i) {
      std::printf("%s[%llu, %ld]", i ? ", " : "", (unsigned long long)samples[i].first, samples[i].second);
    }
    std::printf("]}\n");
  } else {
    std::fprintf(stderr, "\n");
    std::printf("3 gateways (CurveZMQ, loopback), %llu rounds of %zu bytes each way, %.1f s\n",
                (unsigned long long)rounds, bytes, secs);
    std::printf("resident memory after 10 rounds %ld KiB, after %llu rounds %ld KiB, at the end %ld KiB: "
                "%+.4f KiB per round since round %llu\n",
                warm, (unsigned long long)from.first, from.second, end, per_round, (unsigned long long)from.first);
  }
  return 0;
}
