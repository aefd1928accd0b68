// strait_bench_tcp: the raw-TCP baseline for `./strait bench transport`.
// Two processes each send BYTES to the other at the same time over one TCP
// connection each way (the pattern of a two-site all-gather) and report the
// seconds until both directions are done, best of ROUNDS.
//
//   strait_bench_tcp --listen HOST:PORT --peer HOST:PORT --bytes N [--rounds R]

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

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
  int rounds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--listen") listen_at = argv[i + 1];
    else if (a == "--peer") peer = argv[i + 1];
    else if (a == "--bytes") bytes = std::stoull(argv[i + 1]);
    else if (a == "--rounds") rounds = std::stoi(argv[i + 1]);
  }
  const int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in la = parse(listen_at);
  if (bind(ls, reinterpret_cast<sockaddr*>(&la), sizeof la) != 0) die("bind");
  listen(ls, 1);
  int out = -1;
  const sockaddr_in pa = parse(peer);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (true) {
    out = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(out, reinterpret_cast<const sockaddr*>(&pa), sizeof pa) == 0) break;
    close(out);
    if (std::chrono::steady_clock::now() > give_up) die("connect");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const int in = accept(ls, nullptr, nullptr);
  if (in < 0) die("accept");
  std::vector<char> buf(bytes, 'x'), sink(1 << 20);
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::thread sender([&] {
      size_t sent = 0;
      while (sent < bytes) {
        const ssize_t n = send(out, buf.data() + sent, bytes - sent, 0);
        if (n <= 0) die("send");
        sent += size_t(n);
      }
    });
    size_t got = 0;
    while (got < bytes) {
      const ssize_t n = recv(in, sink.data(), std::min(sink.size(), bytes - got), 0);
      if (n <= 0) die("recv");
      got += size_t(n);
    }
    sender.join();
    // A one-byte barrier so both sides start the next round together.
    char b = 0;
    if (send(out, &b, 1, 0) != 1 || recv(in, &b, 1, MSG_WAITALL) != 1) die("barrier");
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("seconds %.6f\n", best);
  return 0;
}
