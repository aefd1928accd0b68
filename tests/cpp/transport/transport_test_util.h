#pragma once
// Helpers for gateway tests: free loopback ports, a job of N sites with real
// CurveZMQ keys, deterministic payloads every site can verify.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <future>
#include <string>
#include <vector>

#include "core/error.h"
#include "transport/gateway.h"

namespace strait::transport::testing {

// A loopback port that was free a moment ago (bind to 0, read it, close).
inline int freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  ::close(fd);
  return port;
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
                         "tcp://127.0.0.1:" + std::to_string(freePort()),
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
inline std::vector<uint8_t> payloadFor(size_t site, uint64_t round, size_t bytes) {
  std::vector<uint8_t> p(bytes);
  uint64_t x = 0x9e3779b97f4a7c15ULL * (site + 1) ^ (round * 0xbf58476d1ce4e5b9ULL);
  for (size_t i = 0; i < bytes; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = uint8_t(x);
  }
  return p;
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
