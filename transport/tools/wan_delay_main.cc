// strait_wan_delay: the simulated border's latency, in user space (this
// kernel has no tc netem). Attached to a TUN device in the border namespace,
// into which the border routes every packet between sites; each packet is
// held for the one-way delay and written back, and the kernel forwards it on
// to its destination. Every protocol (the gateways' TCP, gloo's, the TCP
// acknowledgements themselves) sees the profile's round-trip time.
//
//   strait_wan_delay --tun NAME --delay-ms MS [--queue-bytes N] [--subnet A.B]
//
// Prints "ready" once attached. On SIGUSR1 prints the counts so far (one JSON
// line, as below) and goes on. On SIGTERM or SIGINT prints one JSON line —
// bytes and packets per (source site -> destination site), where a site is the
// third octet of A.B.<site>.x, plus packets dropped because the queue was full
// — and exits. A full queue drops packets as a router would; TCP recovers.
//
// Segmentation offload: the device is opened with a virtio-net header and
// TSO enabled, so the kernel hands over TCP super-packets of up to 64 KiB
// (as the sites' stacks built them) and segments them after we write them
// back. Per-packet costs (two system calls, a copy) then scale with
// super-packets, not 1500-byte frames: one packet at a time, this router
// took 0.75 of a core for 270 Mbit/s each way and could not pass 1 Gbit/s
// on two cores. The tbf shaping sees the same bytes either way.

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
volatile sig_atomic_t g_stop = 0;
volatile sig_atomic_t g_report = 0;

void onSignal(int) { g_stop = 1; }
void onReport(int) { g_report = 1; }

void printStats(const std::map<std::pair<int, int>, std::pair<uint64_t, uint64_t>>& pairs, uint64_t dropped) {
  std::printf("{\"pairs\": {");
  bool comma = false;
  for (const auto& [k, v] : pairs) {
    std::printf("%s\"%d->%d\": {\"bytes\": %llu, \"packets\": %llu}", comma ? ", " : "", k.first, k.second,
                (unsigned long long)v.first, (unsigned long long)v.second);
    comma = true;
  }
  std::printf("}, \"dropped\": %llu}\n", (unsigned long long)dropped);
  std::fflush(stdout);
}

struct Packet {
  Clock::time_point due;
  std::vector<uint8_t> bytes;
};

int usage() {
  std::fprintf(stderr, "usage: strait_wan_delay --tun NAME --delay-ms MS [--queue-bytes N] [--subnet A.B]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tun;
  double delay_ms = -1;
  size_t queue_limit = 64 << 20;
  unsigned subnet_a = 10, subnet_b = 99;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tun" && i + 1 < argc) {
      tun = argv[++i];
    } else if (a == "--delay-ms" && i + 1 < argc) {
      delay_ms = std::atof(argv[++i]);
    } else if (a == "--queue-bytes" && i + 1 < argc) {
      queue_limit = size_t(std::atoll(argv[++i]));
    } else if (a == "--subnet" && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%u.%u", &subnet_a, &subnet_b) != 2) return usage();
    } else {
      return usage();
    }
  }
  if (tun.empty() || tun.size() >= IFNAMSIZ || delay_ms < 0) return usage();

  const int fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    std::fprintf(stderr, "strait_wan_delay: cannot open /dev/net/tun: %s\n", std::strerror(errno));
    return 1;
  }
  ifreq ifr{};
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
  std::strncpy(ifr.ifr_name, tun.c_str(), IFNAMSIZ - 1);
  if (::ioctl(fd, TUNSETIFF, &ifr) < 0) {
    std::fprintf(stderr, "strait_wan_delay: cannot attach to %s: %s\n", tun.c_str(), std::strerror(errno));
    return 1;
  }
  // struct virtio_net_hdr (linux/virtio_net.h, which C++ cannot include:
  // it has a member named `class`): flags, gso_type, hdr_len, gso_size,
  // csum_start, csum_offset. Passed back as it came.
  const int vnet = 10;
  if (::ioctl(fd, TUNSETVNETHDRSZ, &vnet) < 0) {
    std::fprintf(stderr, "strait_wan_delay: cannot set the virtio-net header size: %s\n", std::strerror(errno));
    return 1;
  }
  // Without offloads (an old kernel) packets still come, one frame each.
  const unsigned offload = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
  if (::ioctl(fd, TUNSETOFFLOAD, offload) < 0) {
    std::fprintf(stderr, "strait_wan_delay: no segmentation offload on %s (%s): one frame per packet\n", tun.c_str(),
                 std::strerror(errno));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  struct sigaction sa {};
  sa.sa_handler = onSignal;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  struct sigaction report {};
  report.sa_handler = onReport;
  ::sigaction(SIGUSR1, &report, nullptr);

  const auto delay = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(delay_ms));
  std::deque<Packet> queue;
  size_t queued = 0;
  uint64_t dropped = 0;
  std::map<std::pair<int, int>, std::pair<uint64_t, uint64_t>> pairs;  // (src, dst) -> (bytes, packets)
  std::vector<uint8_t> buf(size_t(vnet) + 256 * 1024);  // a super-packet is at most 64 KiB (256 KiB: BIG TCP)
  std::printf("ready\n");
  std::fflush(stdout);

  while (!g_stop) {
    if (g_report) {
      g_report = 0;
      printStats(pairs, dropped);
    }
    // Sleep until a packet arrives or the next one is due.
    timespec ts{0, 100000000L};
    if (!queue.empty()) {
      const int64_t us = std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::microseconds>(queue.front().due - Clock::now()).count());
      ts = {time_t(us / 1000000), long(us % 1000000) * 1000L};
    }
    pollfd p{fd, POLLIN, 0};
    const int r = ::ppoll(&p, 1, &ts, nullptr);
    if (r < 0 && errno != EINTR) {
      std::fprintf(stderr, "strait_wan_delay: poll: %s\n", std::strerror(errno));
      return 1;
    }
    // Read everything that arrived.
    for (;;) {
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n <= vnet) break;
      const auto now = Clock::now();
      if (queued + size_t(n) > queue_limit) {
        ++dropped;
        continue;
      }
      queue.push_back({now + delay, std::vector<uint8_t>(buf.begin(), buf.begin() + n)});
      queued += size_t(n);
    }
    // Release everything due.
    const auto now = Clock::now();
    while (!queue.empty() && queue.front().due <= now) {
      Packet& pk = queue.front();
      const std::vector<uint8_t>& packet = pk.bytes;
      const uint8_t* b = packet.data() + vnet;  // the IP header
      const size_t ip_bytes = packet.size() - size_t(vnet);
      if (ip_bytes >= 20 && (b[0] >> 4) == 4 && b[12] == subnet_a && b[13] == subnet_b && b[16] == subnet_a &&
          b[17] == subnet_b) {
        auto& c = pairs[{b[14], b[18]}];
        c.first += ip_bytes;
        c.second += 1;  // super-packets: see above
      }
      if (::write(fd, packet.data(), packet.size()) < 0 && errno != EAGAIN) {
        ++dropped;  // e.g. no route: the kernel refused it
      }
      queued -= packet.size();
      queue.pop_front();
    }
  }
  printStats(pairs, dropped);
  ::close(fd);
  return 0;
}
