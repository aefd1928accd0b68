// strait_test_peer: one site's gateway in its own process, for the
// multi-process transport tests and the transport benchmark.
//
//   strait_test_peer --site I --ports P0,P1,... [--keys DIR | --insecure]
//                    [--rounds N] [--first-round R|auto] [--bytes B] [--chunk C]
//                    [--continue] [--round-deadline-ms MS] [--hard-deadline-ms MS]
//                    [--hosts H0,H1,...]   (default: 127.0.0.1 for every site)
//                    [--streams N] [--io-threads T]   (GatewayOptions' defaults)
//                    [--peer-timeout-ms MS]           (1500)
//                    [--heartbeat-ms MS]              (100; the library's default is 500)
//                    [--gap-ms MS]                    (idle between rounds; 0)
//
// Site I exchanges rounds R..N-1, sending payloadFor(I, round, B) and checking
// that every other site's payload is payloadFor(site, round, B). Prints
// "round R ok seconds S missing M" per round; exits 0 when all rounds passed,
// 1 with a message on any error; last, "peak_rss_kib K" (the process's
// peak resident memory). Keys: DIR/sK.pub and DIR/sK.key.

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/cpp/transport/transport_test_util.h"

using namespace strait::transport;

int main(int argc, char** argv) {
  size_t site = 0;
  std::vector<int> ports;
  std::vector<std::string> hosts;
  std::string keys;
  bool insecure = false;
  uint64_t rounds = 3, first = 0;
  size_t bytes = 1 << 20, chunk = 1 << 20;
  bool cont = false, join = false;
  int64_t round_ms = 20000, hard_ms = 60000, peer_timeout_ms = 1500, heartbeat_ms = 100, gap_ms = 0;
  int streams = GatewayOptions{}.streams, io_threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--site") site = std::stoul(next());
    else if (a == "--ports") {
      std::stringstream ss(next());
      std::string p;
      while (std::getline(ss, p, ',')) ports.push_back(std::stoi(p));
    } else if (a == "--hosts") {
      std::stringstream ss(next());
      std::string h;
      while (std::getline(ss, h, ',')) hosts.push_back(h);
    } else if (a == "--keys") keys = next();
    else if (a == "--insecure") insecure = true;
    else if (a == "--rounds") rounds = std::stoull(next());
    else if (a == "--first-round") {
      const std::string v = next();
      if (v == "auto") join = true;
      else first = std::stoull(v);
    }
    else if (a == "--bytes") bytes = std::stoull(next());
    else if (a == "--chunk") chunk = std::stoull(next());
    else if (a == "--continue") cont = true;
    else if (a == "--round-deadline-ms") round_ms = std::stoll(next());
    else if (a == "--hard-deadline-ms") hard_ms = std::stoll(next());
    else if (a == "--streams") streams = std::stoi(next());
    else if (a == "--peer-timeout-ms") peer_timeout_ms = std::stoll(next());
    else if (a == "--io-threads") io_threads = std::stoi(next());
    else if (a == "--gap-ms") gap_ms = std::stoll(next());
    else if (a == "--heartbeat-ms") heartbeat_ms = std::stoll(next());  // idle between rounds (a DiLoCo-like pattern)
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    GatewayOptions o;
    o.job_id = "test-job";
    o.site = "s" + std::to_string(site);
    for (size_t k = 0; k < ports.size(); ++k) {
      const std::string host = k < hosts.size() ? hosts[k] : "127.0.0.1";
      SiteEndpoint e{"s" + std::to_string(k), "CN", "tcp://" + host + ":" + std::to_string(ports[k]), "", ""};
      if (!insecure) e.public_key = readKeyFile(keys + "/s" + std::to_string(k) + ".pub");
      o.sites.push_back(e);
    }
    o.insecure = insecure;
    if (!insecure) o.secret_key = readKeyFile(keys + "/s" + std::to_string(site) + ".key");
    o.config_fingerprint = {1, 2, 3, 4};
    o.chunk_bytes = chunk;
    o.max_message_bytes = std::max<size_t>(bytes, chunk);
    o.heartbeat = std::chrono::milliseconds(heartbeat_ms);
    o.peer_timeout = std::chrono::milliseconds(peer_timeout_ms);
    o.round_deadline = std::chrono::milliseconds(round_ms);
    o.hard_deadline = std::chrono::milliseconds(hard_ms);
    o.on_site_loss = cont ? OnSiteLoss::kContinue : OnSiteLoss::kWait;
    o.streams = streams;
    o.io_threads = io_threads;
    Gateway g(o);
    if (join) {
      // A restarted peer joins the round the others are in: the lowest
      // 'grad' round a peer has opened (its payloads to our new life start
      // again from the first chunk). Rounds complete on receipt, so that can
      // be the round this site's previous life had already completed.
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(hard_ms);
      std::vector<PeerRound> open;
      while ((open = g.peerRounds("grad")).empty() && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (open.empty()) throw std::runtime_error("--first-round auto: no peer has a round open");
      first = open[0].round;
      for (const PeerRound& pr : open) first = std::min(first, pr.round);
      std::printf("joining at round %llu\n", (unsigned long long)first);
      std::fflush(stdout);
    }
    std::vector<uint8_t> mine;
    for (uint64_t r = first; r < rounds; ++r) {
      testing::fillPayload(mine, site, r, bytes);
      auto f = g.exchange(r, "grad", std::move(mine));
      RoundResult res = testing::getWithin(f, std::chrono::seconds(hard_ms / 1000 + 30));
      for (size_t k = 0; k < res.payloads.size(); ++k) {
        if (res.payloads[k] && !testing::isPayloadOf(*res.payloads[k], k, r, bytes)) {
          std::fprintf(stderr, "round %llu: payload from s%zu is wrong\n", (unsigned long long)r, k);
          return 1;
        }
      }
      std::string missing;
      for (const auto& m : res.missing) missing += (missing.empty() ? "" : ",") + m;
      std::printf("round %llu ok seconds %.6f missing %s\n", (unsigned long long)r, res.seconds,
                  missing.empty() ? "-" : missing.c_str());
      std::fflush(stdout);
      if (gap_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
      // Buffers go back: ours to refill, the peers' to the gateway's pool.
      for (size_t k = 0; k < res.payloads.size(); ++k) {
        if (!res.payloads[k]) continue;
        if (k == site) mine = std::move(*res.payloads[k]);
        else g.recycle(std::move(*res.payloads[k]));
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "s%zu: %s\n", site, e.what());
    return 1;
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("peak_rss_kib %ld\n", ru.ru_maxrss);
  return 0;
}
