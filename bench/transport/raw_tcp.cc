// strait_bench_tcp: the raw-TCP baseline for `./strait bench transport`.
// Two processes each send BYTES to the other at the same time over one TCP
// connection each way (the pattern of a two-site all-gather) and report the
// seconds until both directions are done, best of ROUNDS. With --streams N,
// N connections each way, each carrying an equal slice of the bytes (what a
// user striping by hand would do).
//
//   strait_bench_tcp --listen HOST:PORT --peer HOST:PORT --bytes N [--rounds R] [--streams N]

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

sockaddr_in parse(const std::string& hp) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  const size_t colon = hp.rfind(':');
  inet_pton(AF_INET, hp.substr(0, colon).c_str(), &a.sin_addr);
  a.sin_port = htons(uint16_t(std::stoi(hp.substr(colon + 1))));
  return a;
}

void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen_at, peer;
  size_t bytes = 256u << 20;
  int rounds = 3, streams = 1, gap_ms = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--listen") listen_at = argv[i + 1];
    else if (a == "--peer") peer = argv[i + 1];
    else if (a == "--bytes") bytes = std::stoull(argv[i + 1]);
    else if (a == "--rounds") rounds = std::stoi(argv[i + 1]);
    else if (a == "--streams") streams = std::max(1, std::stoi(argv[i + 1]));
    else if (a == "--gap-ms") gap_ms = std::stoi(argv[i + 1]);  // idle before each round; prints each round
  }
  const int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in la = parse(listen_at);
  if (bind(ls, reinterpret_cast<sockaddr*>(&la), sizeof la) != 0) die("bind");
  listen(ls, streams);
  std::vector<int> out, in;
  const sockaddr_in pa = parse(peer);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (int(out.size()) < streams) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, reinterpret_cast<const sockaddr*>(&pa), sizeof pa) == 0) {
      out.push_back(fd);
      continue;
    }
    close(fd);
    if (std::chrono::steady_clock::now() > give_up) die("connect");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  while (int(in.size()) < streams) {
    const int fd = accept(ls, nullptr, nullptr);
    if (fd < 0) die("accept");
    in.push_back(fd);
  }
  // Stream k carries bytes [k * bytes / streams, (k + 1) * bytes / streams).
  auto piece = [&](int k) { return (size_t(k) + 1) * bytes / size_t(streams) - size_t(k) * bytes / size_t(streams); };
  std::vector<char> buf(bytes, 'x');
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (int k = 0; k < streams; ++k) {
      threads.emplace_back([&, k] {
        const char* from = buf.data() + size_t(k) * bytes / size_t(streams);
        for (size_t sent = 0, n = piece(k); sent < n;) {
          const ssize_t m = send(out[size_t(k)], from + sent, n - sent, 0);
          if (m <= 0) die("send");
          sent += size_t(m);
        }
      });
      threads.emplace_back([&, k] {
        std::vector<char> sink(1 << 20);
        for (size_t got = 0, n = piece(k); got < n;) {
          const ssize_t m = recv(in[size_t(k)], sink.data(), std::min(sink.size(), n - got), 0);
          if (m <= 0) die("recv");
          got += size_t(m);
        }
      });
    }
    for (std::thread& t : threads) t.join();
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (gap_ms > 0) std::printf("round %d seconds %.6f\n", r, took);
    // A one-byte barrier so both sides start the next round together.
    char b = 0;
    if (send(out[0], &b, 1, 0) != 1 || recv(in[0], &b, 1, MSG_WAITALL) != 1) die("barrier");
    // With --gap-ms, each round's own time; otherwise the round and its barrier.
    const double whole = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, gap_ms > 0 ? took : whole);
    if (gap_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
  }
  std::printf("seconds %.6f\n", best);
  return 0;
}
