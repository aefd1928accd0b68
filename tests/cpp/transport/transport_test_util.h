#pragma once
// Helpers for gateway tests: free loopback ports, a job of N sites with real
// CurveZMQ keys, deterministic payloads every site can verify.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "transport/gateway.h"

namespace strait::transport::testing {

// A loopback port that was free a moment ago and that this process has not
// handed out before, taken at random from just below the kernel's ephemeral
// range (the rule of strait.ports.free_port, for the same reason): a port
// from inside that range, what binding port 0 returns, can be taken by an
// outgoing connection, even a peer's own dial to it, before the gateway binds.
inline bool bindableLoopback(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

inline int freePort() {
  static std::mutex mu;
  static std::set<int> given;
  static std::mt19937 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mu);
  int lo = 32768;
  if (std::FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    int a = 0, b = 0;
    if (std::fscanf(f, "%d %d", &a, &b) == 2 && a > 1024) lo = a;
    std::fclose(f);
  }
  const int first = std::max(1024, lo - 12000);
  if (lo - first >= 1000) {
    std::uniform_int_distribution<int> pick(first, lo - 1);
    for (int i = 0; i < 200; ++i) {
      const int port = pick(rng);
      if (!given.count(port) && bindableLoopback(port)) {
        given.insert(port);
        return port;
      }
    }
  }
  for (;;) {  // no room below the range: whatever the kernel gives
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    const int port = ntohs(a.sin_port);
    if (given.insert(port).second) return port;
  }
}

struct Job {
  std::vector<GatewayOptions> sites;  // one per site, ready to construct
  std::vector<KeyPair> keys;
};

// A job of n sites named s0..s(n-1) on loopback, encrypted unless insecure.
// Short liveness settings keep the tests quick.
inline Job makeJob(size_t n, bool insecure = false, size_t chunk_bytes = 64 * 1024) {
  Job job;
  std::vector<SiteEndpoint> endpoints;
  const char* jurisdictions[] = {"CN", "SG", "DE", "US", "JP", "FR"};
  for (size_t i = 0; i < n; ++i) {
    job.keys.push_back(generateKeyPair());
    endpoints.push_back({"s" + std::to_string(i), jurisdictions[i % 6],
                         "tcp://127.0.0.1:" + std::to_string(freePort()), "",
                         insecure ? "" : job.keys.back().public_key});
  }
  for (size_t i = 0; i < n; ++i) {
    GatewayOptions o;
    o.job_id = "test-job";
    o.site = endpoints[i].name;
    o.sites = endpoints;
    o.config_fingerprint = {1, 2, 3, 4};
    o.insecure = insecure;
    o.secret_key = insecure ? "" : job.keys[i].secret_key;
    o.chunk_bytes = chunk_bytes;
    o.max_message_bytes = 64 << 20;
    o.heartbeat = std::chrono::milliseconds(50);
    o.peer_timeout = std::chrono::milliseconds(1000);
    o.round_deadline = std::chrono::milliseconds(20000);
    o.hard_deadline = std::chrono::milliseconds(30000);
    job.sites.push_back(o);
  }
  return job;
}

// The payload site `site` sends in `round`: every site can recompute it.
// Calls fn(offset, word) for the 8-byte words of the payload of (site, round):
// a per-(site, round) seed XOR a multiple of the word's position, so every
// word differs and a misplaced or corrupted chunk shows. Cheap to generate
// and check (it vectorises), so benchmarks measure the transport.
template <typename Fn>
void forEachPayloadWord(size_t site, uint64_t round, size_t bytes, Fn&& fn) {
  const uint64_t seed = 0x9e3779b97f4a7c15ULL * (site + 1) ^ (round * 0xbf58476d1ce4e5b9ULL);
  uint64_t k = 0;
  for (size_t i = 0; i < bytes; i += 8) {
    fn(i, seed ^ k);
    k += 0xd6e8feb86659fd93ULL;
  }
}

// Fills p (resized to bytes, capacity reused) with the payload of (site, round).
inline void fillPayload(std::vector<uint8_t>& p, size_t site, uint64_t round, size_t bytes) {
  p.resize(bytes);
  uint8_t* d = p.data();
  forEachPayloadWord(site, round, bytes, [d, bytes](size_t i, uint64_t w) {
    if (i + 8 <= bytes) {
      std::memcpy(d + i, &w, 8);
    } else {
      std::memcpy(d + i, &w, bytes - i);
    }
  });
}

inline std::vector<uint8_t> payloadFor(size_t site, uint64_t round, size_t bytes) {
  std::vector<uint8_t> p;
  fillPayload(p, site, round, bytes);
  return p;
}

// True when p is exactly the payload of (site, round), without allocating.
inline bool isPayloadOf(const std::vector<uint8_t>& p, size_t site, uint64_t round, size_t bytes) {
  if (p.size() != bytes) return false;
  const uint8_t* d = p.data();
  uint64_t diff = 0;
  forEachPayloadWord(site, round, bytes, [d, bytes, &diff](size_t i, uint64_t w) {
    uint64_t have = 0;
    if (i + 8 <= bytes) {
      std::memcpy(&have, d + i, 8);
    } else {
      std::memcpy(&have, d + i, bytes - i);
      w &= (uint64_t{1} << (8 * (bytes - i))) - 1;
    }
    diff |= have ^ w;
  });
  return diff == 0;
}

// Waits for a future with a deadline; a test never hangs.
template <typename T>
T getWithin(std::future<T>& f, std::chrono::seconds limit = std::chrono::seconds(60)) {
  if (f.wait_for(limit) != std::future_status::ready) {
    throw strait::TimeoutError("test: future not ready within " + std::to_string(limit.count()) + " s");
  }
  return f.get();
}

}  // namespace strait::transport::testing
