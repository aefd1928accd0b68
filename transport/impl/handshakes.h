#pragma once
// Connections this site's ROUTER accepted that have not spoken yet
// (transport-internal). Until a connection delivers its first message it has
// not finished the ZMTP and CurveZMQ handshakes, so it proved nothing; yet
// libzmq allocates for it whatever frame size it claims, up to
// ZMQ_MAXMSGSIZE (a chunk plus 64 KiB), and keeps it for ZMQ_HANDSHAKE_IVL.
// Thousands of keyless clients could so hold gigabytes. This table keeps
// the accepted-but-silent connections in the order they came and names the
// oldest beyond a limit, for the gateway to drop (docs/SECURITY.md). A pure
// state machine keyed by file descriptor; no sockets, not thread-safe (the
// I/O thread owns it).

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace strait::transport {

class PendingHandshakes {
 public:
  explicit PendingHandshakes(size_t limit) : limit_(limit) {}

  // A new connection on descriptor fd (the monitor's ACCEPTED event). A
  // descriptor seen before is a new connection that reuses it.
  void accepted(int fd) {
    finished(fd);
    by_fd_[fd] = next_;
    by_age_[next_++] = fd;
  }
  // It delivered a message (its handshake is done) or it went away.
  void finished(int fd) {
    auto it = by_fd_.find(fd);
    if (it == by_fd_.end()) return;
    by_age_.erase(it->second);
    by_fd_.erase(it);
  }
  bool empty() const { return by_fd_.empty(); }
  size_t size() const { return by_fd_.size(); }
  size_t limit() const { return limit_; }

  // The oldest connections beyond the limit, oldest first, forgotten here:
  // the caller drops them.
  std::vector<int> overLimit() {
    std::vector<int> out;
    while (by_fd_.size() > limit_) {
      auto oldest = by_age_.begin();
      out.push_back(oldest->second);
      by_fd_.erase(oldest->second);
      by_age_.erase(oldest);
    }
    return out;
  }

 private:
  size_t limit_;
  uint64_t next_ = 0;
  std::map<int, uint64_t> by_fd_;
  std::map<uint64_t, int> by_age_;
};

}  // namespace strait::transport
