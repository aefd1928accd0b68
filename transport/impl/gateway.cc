// The site gateway's I/O thread: sockets, the poll loop, ZAP, the monitors,
// and dispatch. docs/PROTOCOL.md ("Gateway protocol") is the contract; the
// rules live in parts that each own their state and are tested alone:
//   RoundTable   (round_table.h)   rounds: chunks in and out, completion,
//                                  refusals, partings, deadlines
//   PeerTable    (peer_table.h)    peers' liveness and lives
//   EgressGuard  (egress_guard.h)  egress policy, audit log, privacy budget
//   frame.h                        parsing, checks, and the envelopes we send
// This file turns socket events into their events and their effects into
// socket writes.
//
// Sockets (all owned by the I/O thread):
//   router_   bound at this site's endpoint; receives every peer's DEALER
//             (Hello, Heartbeat, Chunk) and answers on it (Welcome, Ack,
//             Nack, Refuse, Closed). CurveZMQ server.
//   links_    per peer, `streams` DEALERs (a TCP connection each), connected
//             to the peer's ROUTER; each sends its Hello and heartbeats, and
//             payload chunks are striped over those welcomed. CurveZMQ client.
//   zap_      the ZAP handler (RFC 27): admits only the job's public keys.
//   monitors  one per DEALER: reconnects trigger a new Hello, and the chunks
//             that went on a broken connection go again;
//             one on the ROUTER: accepted connections that have not spoken
//             yet are counted, and the oldest beyond a limit dropped.
// exchange() talks to the thread through a mutex-guarded queue and an eventfd.

#include "transport/gateway.h"

#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "core/error.h"
#include "core/json.h"
#include "transport/checksum.h"
#include "transport/impl/egress_guard.h"
#include "transport/impl/frame.h"
#include "transport/impl/handshakes.h"
#include "transport/impl/peer_table.h"
#include "transport/impl/round_table.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {

namespace {

using core::MessageKind;

// Accepted connections held before they speak (PendingHandshakes). Real
// peers speak within a round trip of connecting; each held connection may
// cost up to ZMQ_MAXMSGSIZE (about a chunk) of memory.
constexpr size_t kMaxPendingHandshakes = 64;

bool isLoopback(const std::string& endpoint) {
  const std::string rest = endpoint.substr(endpoint.find("://") == std::string::npos ? 0 : endpoint.find("://") + 3);
  const std::string host = rest.substr(0, rest.rfind(':'));
  return host == "localhost" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

// One connection of ours to a peer's ROUTER: a DEALER and its monitor.
struct Stream {
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<zmq::socket_t> monitor;
  bool welcomed = false;  // our Hello accepted by its ROUTER
  bool handshaken = false;  // the current connection passed the ZMTP/CurveZMQ handshake
  int failed_handshakes = 0;  // connections in a row that closed before their handshake passed
  Clock::time_point hello_sent;
  Clock::time_point last_heartbeat{};
  int fd = -1;  // its TCP socket (the monitor's CONNECTED event), for test_cut_stream
  bool test_cut = false;  // test_cut_stream: cut, and never welcomed again
};

// Our side of the link to one peer: the streams we send on.
struct Link {
  size_t index = 0;  // the peer's site index
  std::string name;
  std::vector<Stream> streams;

  bool welcomed() const {
    return std::any_of(streams.begin(), streams.end(), [](const Stream& s) { return s.welcomed; });
  }
};

// A ROUTER connection that speaks for a site: its welcomed Hello's stream
// and life.
struct Conn {
  size_t site = 0;
  uint32_t stream = 0;
  uint64_t incarnation = 0;
};

// ZeroMQ I/O threads: each connection's encryption and TCP run on one, so
// several streams use several cores.
int ioThreads(const GatewayOptions& o) {
  if (o.io_threads > 0) return o.io_threads;
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(2, std::min(o.streams + 1, cores));
}

struct Command {
  uint64_t round;
  std::string tag;
  MessageKind kind;
  std::shared_ptr<std::vector<uint8_t>> payload;
  std::promise<RoundResult> promise;
};

std::string siteIndexOf(const GatewayOptions& o, size_t* self) {
  for (size_t i = 0; i < o.sites.size(); ++i) {
    if (o.sites[i].name == o.site) {
      *self = i;
      return "";
    }
  }
  return o.sites.empty() ? "gateway: no sites" : "gateway: site '" + o.site + "' is not a site of the job";
}

std::vector<std::string> siteNames(const GatewayOptions& o) {
  std::vector<std::string> names;
  for (const SiteEndpoint& s : o.sites) names.push_back(s.name);
  return names;
}

}  // namespace

class Gateway::Impl {
 public:
  explicit Impl(GatewayOptions options)
      : opt_(std::move(options)),
        self_(validate()),
        egress_(opt_, self_, [this](const std::string& line) { log(line); }),
        peers_(siteNames(opt_), self_, opt_.peer_timeout),
        rounds_(RoundRules::of(opt_, self_), [this](uint64_t bytes) { return recycledBuffer(bytes); }) {
    hello_terms_.job_id = opt_.job_id;
    hello_terms_.self = opt_.site;
    for (size_t i : peers_.peers()) {
      hello_terms_.peers.push_back(opt_.sites[i].name);
      hello_terms_.jurisdictions.push_back(opt_.sites[i].jurisdiction);
    }
    hello_terms_.config_fingerprint.assign(opt_.config_fingerprint.begin(), opt_.config_fingerprint.end());
    hello_terms_.curve = !opt_.insecure;
    hello_terms_.streams = uint32_t(opt_.streams);
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) fail<Error>("gateway: eventfd failed: ", std::strerror(errno));
    std::random_device rd;
    incarnation_ = (uint64_t(rd()) << 32) ^ rd() ^ uint64_t(Clock::now().time_since_epoch().count());
    std::promise<void> started;
    auto ready = started.get_future();
    io_ = std::thread([this, &started] { run(started); });
    try {
      ready.get();
    } catch (...) {
      io_.join();
      ::close(wake_fd_);
      throw;
    }
  }

  void stop(const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_reason_.empty()) stop_reason_ = reason;
    }
    stop_.store(true);
    wake();
    if (io_.joinable()) io_.join();
  }

  ~Impl() {
    stop_.store(true);
    wake();
    if (io_.joinable()) io_.join();
    ::close(wake_fd_);
  }

  std::future<RoundResult> exchange(uint64_t round, const std::string& tag, std::vector<uint8_t> payload,
                                    MessageKind kind) {
    if (payload.size() > opt_.max_message_bytes) {
      fail<InvalidArgument>("exchange: payload of ", payload.size(), " bytes exceeds max_message_bytes = ",
                            opt_.max_message_bytes);
    }
    if (tag.empty() || tag.size() > kMaxTagBytes) {
      fail<InvalidArgument>("exchange: a tag is 1 to ", kMaxTagBytes, " bytes");
    }
    egress_.check(round, tag, payload, kind);
    std::unique_lock<std::mutex> lock(mu_);
    rethrowFatal();
    if (!open_keys_.insert({round, tag}).second) {
      fail<InvalidArgument>("exchange: round ", round, " tag '", tag, "' is already in flight");
    }
    if (egress_.audited()) {
      // Write-ahead: the records are on disk before anything can leave. A
      // failure (a full disk) fails this call and nothing is sent.
      lock.unlock();
      try {
        egress_.recordOut(round, tag, payload.data(), payload.size(), kind);
      } catch (...) {
        lock.lock();
        open_keys_.erase({round, tag});
        throw;
      }
      lock.lock();
    }
    // Join messages (tags "strait.join...") take no slot: a running site
    // answers a restarted one while its own rounds, waiting for that very
    // site, hold every slot. They are few: one answer per request, and a
    // peer can open at most 2 x max_rounds_in_flight rounds ahead.
    const bool slotted = tag.rfind("strait.join", 0) != 0;
    const auto deadline = Clock::now() + opt_.hard_deadline;
    while (slotted && open_rounds_ >= opt_.max_rounds_in_flight) {
      if (slots_.wait_until(lock, deadline) == std::cv_status::timeout &&
          open_rounds_ >= opt_.max_rounds_in_flight) {
        open_keys_.erase({round, tag});
        fail<TimeoutError>("exchange: ", open_rounds_, " rounds still in flight after the hard deadline (",
                           opt_.hard_deadline.count(), " ms); max_rounds_in_flight = ",
                           opt_.max_rounds_in_flight);
      }
      if (fatal_) {
        open_keys_.erase({round, tag});
        std::rethrow_exception(fatal_);
      }
    }
    if (slotted) {
      ++open_rounds_;
    } else {
      unslotted_.insert({round, tag});
    }
    Command c{round, tag, kind, std::make_shared<std::vector<uint8_t>>(std::move(payload)), {}};
    auto future = c.promise.get_future();
    commands_.push_back(std::move(c));
    lock.unlock();
    wake();
    return future;
  }

  double privatize(float* x, size_t n, double norm) { return egress_.privatize(x, n, norm); }
  double chargePrivacyRelease() { return egress_.chargeRelease(); }
  double privacySpent() const { return egress_.spent(); }
  uint64_t privacyReleases() const { return egress_.releases(); }
  std::string auditHead() const { return egress_.auditHead(); }
  uint64_t auditRecords() const { return egress_.auditRecords(); }

  void recycle(std::vector<uint8_t> buffer) {
    if (buffer.capacity() == 0) return;
    buffer.resize(buffer.capacity());  // keep it sized: a later resize down is free
    std::lock_guard<std::mutex> lock(mu_);
    if (pool_.size() < poolLimit()) pool_.push_back(std::move(buffer));
  }

  bool waitForSlot(std::chrono::milliseconds within) {
    std::unique_lock<std::mutex> lock(mu_);
    return slots_.wait_for(lock, within, [&] { return open_rounds_ < opt_.max_rounds_in_flight || fatal_; });
  }

  std::vector<std::string> livePeers() const {
    std::lock_guard<std::mutex> lock(mu_);
    return live_;
  }

  std::vector<std::string> takeReturnedPeers() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    out.swap(returned_);
    return out;
  }

  std::vector<std::string> takeDivergedPeers() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    out.swap(diverged_);
    return out;
  }

  std::vector<PeerRound> peerRounds(const std::string& prefix) const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<PeerRound> out;
    for (const PeerRound& r : opened_) {
      if (r.tag.compare(0, prefix.size(), prefix) == 0) out.push_back(r);
    }
    return out;
  }

  const GatewayOptions& options() const { return opt_; }
  size_t self() const { return self_; }

 private:
  size_t poolLimit() const { return size_t(opt_.max_rounds_in_flight) * opt_.sites.size(); }

  // A recycled buffer of at least `bytes` bytes, sized to `bytes` (memory
  // this process holds already: the steady state allocates nothing), or an
  // empty one that the round table grows as chunks arrive.
  std::vector<uint8_t> recycledBuffer(uint64_t bytes) {
    std::vector<uint8_t> out;
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < pool_.size(); ++i) {
      if (pool_[i].size() >= bytes) {
        out = std::move(pool_[i]);
        pool_.erase(pool_.begin() + long(i));
        out.resize(bytes);  // within its capacity: no allocation
        break;
      }
    }
    return out;
  }

  // ------------------------------------------------------------- setup ---

  // Checks the options; returns this site's index.
  size_t validate() {
    size_t self = 0;
    const std::string bad = siteIndexOf(opt_, &self);
    if (!bad.empty()) fail<InvalidArgument>(bad);
    if (opt_.chunk_bytes == 0) fail<InvalidArgument>("gateway: chunk_bytes must be > 0");
    if (opt_.max_message_bytes / opt_.chunk_bytes > 0xffffffffULL) {
      fail<InvalidArgument>("gateway: max_message_bytes = ", opt_.max_message_bytes, " is more than 2^32 - 1 chunks of ",
                            opt_.chunk_bytes, " bytes (chunk indices are 32-bit): raise chunk_bytes");
    }
    if (opt_.max_rounds_in_flight < 1) fail<InvalidArgument>("gateway: max_rounds_in_flight must be >= 1");
    if (opt_.streams < 1 || opt_.streams > 64) fail<InvalidArgument>("gateway: streams must be 1 to 64, not ", opt_.streams);
    if (opt_.io_threads < 0 || opt_.io_threads > 64) {
      fail<InvalidArgument>("gateway: io_threads must be 0 (automatic) to 64, not ", opt_.io_threads);
    }
    if (opt_.insecure) {
      for (const SiteEndpoint& s : opt_.sites) {
        for (const std::string& where : {s.endpoint, s.bind}) {
          if (!where.empty() && !isLoopback(where)) {
            fail<InvalidArgument>("gateway: insecure (plaintext) is allowed only on loopback endpoints; site '",
                                  s.name, "' is at ", where, ". Configure CurveZMQ keys instead");
          }
        }
      }
    } else {
      if (opt_.secret_key.size() != 40) {
        fail<InvalidArgument>("gateway: site '", opt_.site, "' has no CurveZMQ secret key (40 Z85 characters); "
                              "generate one with ./strait keys generate ", opt_.site);
      }
      for (const SiteEndpoint& s : opt_.sites) {
        if (s.public_key.size() != 40) {
          fail<InvalidArgument>("gateway: site '", s.name, "' has no CurveZMQ public key (40 Z85 characters)");
        }
      }
    }
    return self;
  }

  int perStreamHwm() const { return std::max(2, (opt_.high_water_mark + opt_.streams - 1) / opt_.streams); }

  void setCommon(zmq::socket_t& s) {
    s.set(zmq::sockopt::linger, 0);
    // Chunks queue per connection, so a peer's high_water_mark is split
    // over its streams (a DEALER's sends: openStream; what the ROUTER
    // receives, a connection per peer stream). Replies are few and keep it whole.
    s.set(zmq::sockopt::sndhwm, opt_.high_water_mark);
    s.set(zmq::sockopt::rcvhwm, perStreamHwm());
    // A dead connection is dropped and re-established: TCP gives up on data
    // (the gateway's Heartbeats included: every welcomed stream sends one
    // each heartbeat_ms) unacknowledged, or a zero window, for twice the
    // peer timeout (a receiver busy for a moment under load is not a dead
    // one), and keepalive probes find a dead peer of an idle connection
    // (a ROUTER's, which only answers). That is the dead-link detector.
    // ZMTP's heartbeats are off. With them libzmq 4.3.4 (Debian 12's)
    // aborts the process ("Assertion failed: !_io_error
    // (src/stream_engine_base.cpp:331)", libzmq issue 4364): a connection
    // whose input is stopped (its receive queue full: a loaded or frozen
    // gateway) and which the peer then resets is marked failed without
    // being closed, and the heartbeat timer's next PING writes on it. The
    // chaos suite's frozen-site test hit it once a stream's receive queue
    // was an eighth of the high-water mark. And a DEALER's PING waits
    // behind the chunks queued on its connection: on a slow stream ZMTP's
    // timeout dropped live connections over and over (8 streams across
    // 100 Mbit/s: 0.85x the rate of one).
    const int maxrt = static_cast<int>(std::min<int64_t>(2 * opt_.peer_timeout.count(), 6553500));
    s.set(zmq::sockopt::tcp_maxrt, maxrt);
    const int idle_s = std::max(1, int((opt_.peer_timeout.count() + 999) / 1000));
    s.set(zmq::sockopt::tcp_keepalive, 1);
    s.set(zmq::sockopt::tcp_keepalive_idle, idle_s);
    s.set(zmq::sockopt::tcp_keepalive_intvl, idle_s);
    s.set(zmq::sockopt::tcp_keepalive_cnt, 2);
    // A single frame never exceeds a chunk plus its envelope.
    s.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(opt_.chunk_bytes + 65536));
  }

  // Each stream costs three ZeroMQ sockets (its DEALER, the monitor's two
  // ends) and about five descriptors (their mailboxes, the connection, the
  // peer's connection to our ROUTER): a job of many sites with many streams
  // passes ZeroMQ's default of 1023 sockets and the usual 1024 descriptors.
  void reserveSockets() {
    const size_t streams = size_t(opt_.streams) * (opt_.sites.size() - 1);
    ctx_.set(zmq::ctxopt::max_sockets, static_cast<int>(std::max<size_t>(1023, 3 * streams + 16)));
    const rlim_t need = rlim_t(5 * streams + 64);
    rlimit fds{};
    if (::getrlimit(RLIMIT_NOFILE, &fds) != 0 || fds.rlim_cur == RLIM_INFINITY || fds.rlim_cur >= need) return;
    const rlimit raised{fds.rlim_max == RLIM_INFINITY ? need : std::min(need, fds.rlim_max), fds.rlim_max};
    if (raised.rlim_cur >= need && ::setrlimit(RLIMIT_NOFILE, &raised) == 0) return;
    fail<Error>("gateway '", opt_.site, "': ", opt_.streams, " streams to each of ", opt_.sites.size() - 1,
                " peers need about ", need, " file descriptors, and this process may open only ", fds.rlim_max,
                " (ulimit -n): lower transport.streams or raise the limit");
  }

  void openSockets() {
    reserveSockets();
    if (!opt_.insecure) {
      zap_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::rep);
      zap_->set(zmq::sockopt::linger, 0);
      zap_->bind("inproc://zeromq.zap.01");
    }
    router_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::router);
    setCommon(*router_);
    router_->set(zmq::sockopt::router_mandatory, 1);
    // No ROUTER handover: a connection that names an existing routing id is
    // refused by ZeroMQ instead of taking the other's place (a takeover, and
    // in libzmq 4.3.4 a way to abort this process). Our DEALERs name none:
    // the ROUTER gives each connection its own id, and a welcomed Hello binds
    // that id to a site (conns_).
    if (!opt_.insecure) {
      router_->set(zmq::sockopt::curve_server, 1);
      router_->set(zmq::sockopt::curve_secretkey, opt_.secret_key);
      router_->set(zmq::sockopt::zap_domain, "strait");
    }
    if (zmq_socket_monitor(router_->handle(), "inproc://monitor-router",
                           ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0) {
      fail<Error>("gateway: cannot monitor socket: ", zmq_strerror(zmq_errno()));
    }
    router_monitor_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::pair);
    router_monitor_->set(zmq::sockopt::linger, 0);
    router_monitor_->connect("inproc://monitor-router");
    const SiteEndpoint& self = opt_.sites[self_];
    const std::string& me = self.bind.empty() ? self.endpoint : self.bind;
    try {
      router_->bind(me);
    } catch (const zmq::error_t& e) {
      fail<Error>("gateway '", opt_.site, "': cannot listen on ", me, ": ", e.what());
    }
    const std::string bound = router_->get(zmq::sockopt::last_endpoint);
    bound_port_ = std::atoi(bound.substr(bound.rfind(':') + 1).c_str());
    for (size_t i : peers_.peers()) {
      Link p;
      p.index = i;
      p.name = opt_.sites[i].name;
      p.streams.resize(size_t(opt_.streams));
      for (size_t k = 0; k < p.streams.size(); ++k) openStream(i, k, p.streams[k]);
      links_.push_back(std::move(p));
    }
  }

  void openStream(size_t peer, size_t k, Stream& s) {
    s.dealer = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::dealer);
    setCommon(*s.dealer);
    // Its queue is the peer's high_water_mark split over the streams: a
    // chunk goes to a stream when the stream has room, so a slower
    // connection takes fewer chunks instead of holding up the payload's end
    // with a fixed share.
    s.dealer->set(zmq::sockopt::sndhwm, perStreamHwm());
    s.dealer->set(zmq::sockopt::immediate, 1);  // queue only to a live connection
    s.dealer->set(zmq::sockopt::reconnect_ivl, 100);
    // Back off to at most half the peer timeout (and 2 s): a peer back from
    // a partition or a restart is heard again soon after it can be.
    s.dealer->set(zmq::sockopt::reconnect_ivl_max,
                  static_cast<int>(std::clamp<int64_t>(opt_.peer_timeout.count() / 2, 100, 2000)));
    // A connect attempt made while the link is down must not sit in TCP's
    // SYN back-off (minutes) after it comes back: retry instead.
    s.dealer->set(zmq::sockopt::connect_timeout, static_cast<int>(opt_.peer_timeout.count()));
    if (!opt_.insecure) {
      s.dealer->set(zmq::sockopt::curve_serverkey, opt_.sites[peer].public_key);
      s.dealer->set(zmq::sockopt::curve_publickey, opt_.sites[self_].public_key);
      s.dealer->set(zmq::sockopt::curve_secretkey, opt_.secret_key);
    }
    const std::string mon = "inproc://monitor-" + std::to_string(peer) + "-" + std::to_string(k);
    if (zmq_socket_monitor(s.dealer->handle(), mon.c_str(),
                           ZMQ_EVENT_CONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED |
                               ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) != 0) {
      fail<Error>("gateway: cannot monitor socket: ", zmq_strerror(zmq_errno()));
    }
    s.monitor = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::pair);
    s.monitor->set(zmq::sockopt::linger, 0);
    s.monitor->connect(mon);
    s.dealer->connect(opt_.sites[peer].endpoint);
  }

  // ---------------------------------------------------------- the loop ---

  void run(std::promise<void>& started) {
    // Signals go to the application's threads: an EINTR here would
    // otherwise surface as a fatal zmq error.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    try {
      openSockets();
    } catch (...) {
      closeSockets();
      started.set_exception(std::current_exception());
      return;
    }
    started.set_value();
    try {
      while (!stop_.load()) turn(true);
      awaitWelcomes();
      linger();
    } catch (const std::exception& e) {
      setFatal(std::current_exception(), e.what());
    }
    failAll("gateway stopped");
    sayStopped();
    closeSockets();
  }

  // A site that stops right after it started (a config error found after
  // its gateway came up) has not been welcomed yet: give its Hellos a
  // moment, so that the peers hear why it stops. Only with a reason
  // (Gateway::stop); a plain destruction does not wait.
  void awaitWelcomes() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_reason_.empty() || fatal_) return;
    }
    const auto until = Clock::now() + std::min<std::chrono::milliseconds>(opt_.peer_timeout, std::chrono::seconds(2));
    auto waiting = [&] {
      return std::any_of(links_.begin(), links_.end(), [](const Link& p) { return !p.welcomed(); });
    };
    while (waiting() && Clock::now() < until && !fatal_) {
      poll();
      timers();
    }
  }

  // Rounds complete on receipt (PROTOCOL.md), so this site's payload of its
  // last rounds may still be on its way to a peer when the application
  // closes: keep sending and answering until every live peer has
  // acknowledged every delivered round's payload. Bounded: a payload is
  // given up at its round's hard deadline, a peer silent for twice the peer
  // timeout or that says it stopped is not waited for. Not after a fatal error.
  void linger() {
    const auto started = Clock::now();
    auto next_log = started + opt_.peer_timeout;
    for (;;) {
      const auto now = Clock::now();
      // A peer silent for twice the peer timeout is taken for gone; one that
      // was only stalled (its machine busy, a 3 GiB buffer being filled)
      // would otherwise lose the payload this site still owes it.
      const std::vector<size_t> waiting = rounds_.awaitingAcks(now, peers_, 2 * opt_.peer_timeout);
      if (waiting.empty() || fatal_) return;
      if (now >= next_log) {
        std::string names;
        for (size_t i : waiting) names += (names.empty() ? "'" : ", '") + opt_.sites[i].name + "'";
        log("closing: waiting " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(now - started).count()) +
            " s so far for " + names + " to acknowledge this site's last payloads (not past the hard deadline)");
        next_log = now + std::max(opt_.peer_timeout, std::chrono::milliseconds(5000));
      }
      turn(false);  // no new exchanges: the application has closed
    }
  }

  // One pass of the I/O loop: what arrived, new exchanges (unless closing),
  // what can be sent, heartbeats and liveness, then the round table's clock.
  void turn(bool take_commands) {
    poll();
    if (take_commands) takeCommands();
    sendChunks();
    timers();
    Effects fx;
    rounds_.tick(Clock::now(), peers_, fx);
    apply(fx, nullptr);
  }

  // Best effort, on each connection a peer welcomed: why this gateway
  // stops, so its peers stop waiting for it (closeSockets lingers a moment
  // for these to leave).
  void sayStopped() {
    std::string reason;
    {
      std::lock_guard<std::mutex> lock(mu_);
      reason = fatal_ ? "failed: " + fatal_what_ : stop_reason_.empty() ? "closed" : stop_reason_;
    }
    for (Link& p : links_) {
      for (Stream& s : p.streams) {  // on each: any may be the one that gets through
        if (!s.welcomed || !s.dealer) continue;
        try {
          sendEnvelope(*s.dealer, stoppedEnvelope(incarnation_, reason), nullptr);
        } catch (const zmq::error_t&) {
        }
      }
    }
  }

  void closeSockets() {
    // Give queued replies (an Ack sent just before shutdown) a bounded time
    // to leave; a peer waiting for it would otherwise wait for nothing.
    const int linger = static_cast<int>(std::min<int64_t>(opt_.peer_timeout.count(), 1000));
    if (router_) router_->set(zmq::sockopt::linger, linger);
    for (Link& p : links_) {
      for (Stream& s : p.streams) {
        if (s.dealer) s.dealer->set(zmq::sockopt::linger, linger);
      }
    }
    for (Link& p : links_) {
      for (Stream& s : p.streams) {
        if (s.dealer) zmq_socket_monitor(s.dealer->handle(), nullptr, 0);
        s.monitor.reset();
        s.dealer.reset();
      }
    }
    if (router_) zmq_socket_monitor(router_->handle(), nullptr, 0);
    router_monitor_.reset();
    router_.reset();
    zap_.reset();
    ctx_.close();
  }

  void poll() {
    std::vector<zmq::pollitem_t> items;
    items.push_back({nullptr, wake_fd_, ZMQ_POLLIN, 0});
    items.push_back({router_->handle(), 0, ZMQ_POLLIN, 0});
    if (zap_) items.push_back({zap_->handle(), 0, ZMQ_POLLIN, 0});
    const size_t router_events = items.size();
    items.push_back({router_monitor_->handle(), 0, ZMQ_POLLIN, 0});
    const size_t first_peer = items.size();
    for (Link& p : links_) {
      const bool work = rounds_.hasWork(p.index);
      for (Stream& s : p.streams) {
        items.push_back({s.dealer->handle(), 0, short(ZMQ_POLLIN | (s.welcomed && work ? ZMQ_POLLOUT : 0)), 0});
        items.push_back({s.monitor->handle(), 0, ZMQ_POLLIN, 0});
      }
    }
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(pollTimeoutMs()));
    if (items[0].revents & ZMQ_POLLIN) {
      uint64_t v;
      while (::read(wake_fd_, &v, sizeof v) > 0) {
      }
    }
    if (zap_ && (items[2].revents & ZMQ_POLLIN)) handleZap();
    if (items[router_events].revents & ZMQ_POLLIN) handleRouterMonitor();
    // Drain in bounded batches so one busy socket cannot starve the others.
    for (int i = 0; i < 256 && (items[1].revents & ZMQ_POLLIN); ++i) {
      if (!receiveRouter()) break;
    }
    size_t at = first_peer;
    for (Link& p : links_) {
      for (size_t k = 0; k < p.streams.size(); ++k, at += 2) {
        if (items[at + 1].revents & ZMQ_POLLIN) handleMonitor(p, k);
        for (int i = 0; i < 64 && (items[at].revents & ZMQ_POLLIN); ++i) {
          if (!receiveDealer(p, p.streams[k])) break;
        }
      }
    }
  }

  long pollTimeoutMs() const { return std::max<long>(1, std::min<long>(opt_.heartbeat.count() / 2, 50)); }

  void wake() {
    const uint64_t one = 1;
    ssize_t r = ::write(wake_fd_, &one, sizeof one);
    (void)r;
  }

  // The round table's effects: replies on `routing` (the connection the
  // event came on), then logs, partings and settled rounds.
  void apply(Effects& fx, const std::string* routing) {
    if (routing != nullptr) {
      for (const wire::Envelope& env : fx.replies) reply(*routing, env);
    }
    for (const std::string& line : fx.logs) log(line);
    if (!fx.parted.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i : fx.parted) {
        const std::string& name = opt_.sites[i].name;
        if (std::find(diverged_.begin(), diverged_.end(), name) == diverged_.end() && diverged_.size() < 64) {
          diverged_.push_back(name);
        }
      }
    }
    for (Delivery& d : fx.delivered) deliver(d);
    for (auto& f : fx.failed) settle(f.first, nullptr, f.second);
    for (const Key& k : fx.done) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        releaseSlot(k);
      }
      slots_.notify_all();
    }
  }

  // Every payload received is on record before the caller sees it.
  void deliver(Delivery& d) {
    RoundResult& res = d.result;
    const Key key{res.round, res.tag};
    if (egress_.audited()) {
      try {
        for (size_t i : peers_.peers()) {
          const auto& in = res.payloads[i];
          if (in) egress_.recordIn(res.round, res.tag, in->data(), in->size(), d.kinds[i], i);
        }
      } catch (const std::exception& e) {
        settle(key, nullptr,
               std::make_exception_ptr(Error("gateway '" + opt_.site + "': round " + std::to_string(res.round) +
                                             " '" + res.tag + "' not delivered: " + e.what())));
        return;
      }
    }
    writeMetrics(res);
    settle(key, &res, nullptr);
  }

  void settle(const Key& key, RoundResult* res, std::exception_ptr e) {
    auto it = promises_.find(key);
    if (it == promises_.end()) return;
    if (res != nullptr) {
      it->second.set_value(std::move(*res));
    } else {
      it->second.set_exception(e);
    }
    promises_.erase(it);
  }

  // -------------------------------------------------------------- ZAP ---

  void handleZap() {
    std::vector<zmq::message_t> req;
    if (!zmq::recv_multipart(*zap_, std::back_inserter(req), zmq::recv_flags::dontwait)) return;
    // RFC 27: version, request id, domain, address, routing id, mechanism, credentials...
    std::string status = "400", text = "malformed ZAP request", user;
    std::string address = req.size() > 3 ? req[3].to_string() : "?";
    if (req.size() >= 7 && req[0].to_string() == "1.0" && req[5].to_string() == "CURVE" && req[6].size() == 32) {
      char z85[41];
      zmq_z85_encode(z85, static_cast<const uint8_t*>(req[6].data()), 32);
      const std::string key(z85);
      text = "unknown key";
      for (const SiteEndpoint& s : opt_.sites) {
        if (s.public_key == key) {
          status = "200";
          text = "OK";
          user = s.name;
        }
      }
      if (status != "200") {
        log("refused a connection from " + address + ": public key " + key +
            " is not one of this job's sites");
      }
    }
    const std::string version = "1.0", request = req.size() > 1 ? req[1].to_string() : "", metadata;
    std::array<zmq::const_buffer, 6> frames = {zmq::buffer(version), zmq::buffer(request), zmq::buffer(status),
                                               zmq::buffer(text),    zmq::buffer(user),    zmq::buffer(metadata)};
    zmq::send_multipart(*zap_, frames);
  }

  // ------------------------------------------- connections not spoken ---

  // Accepted connections in, closed ones out; the oldest beyond the limit
  // that have not delivered a message yet (PendingHandshakes) are shut down.
  void handleRouterMonitor() {
    while (true) {
      zmq::message_t event, addr;
      if (!router_monitor_->recv(event, zmq::recv_flags::dontwait)) break;
      if (!router_monitor_->recv(addr, zmq::recv_flags::dontwait)) break;
      uint16_t id;
      uint32_t fd;
      std::memcpy(&id, event.data(), sizeof id);
      std::memcpy(&fd, static_cast<const uint8_t*>(event.data()) + sizeof id, sizeof fd);
      if (id == ZMQ_EVENT_ACCEPTED) handshakes_.accepted(int(fd));
      if (id == ZMQ_EVENT_DISCONNECTED) handshakes_.finished(int(fd));
    }
    size_t dropped = 0;
    for (int fd : handshakes_.overLimit()) {
      // Every event up to now is read, so fd is still the connection it was
      // accepted as; check anyway that it is one of this ROUTER's accepted
      // TCP connections before touching it. libzmq sees the shutdown as the
      // peer closing, and cleans up as it would then.
      if (acceptedHere(fd) && ::shutdown(fd, SHUT_RDWR) == 0) ++dropped;
    }
    if (dropped == 0) return;
    dropped_ += dropped;
    const auto now = Clock::now();
    if (now >= next_drop_log_) {
      log("dropped " + std::to_string(dropped_) + " connection(s) that had not finished the handshake: at most " +
          std::to_string(handshakes_.limit()) + " are held at a time (a flood of unauthenticated clients?)");
      dropped_ = 0;
      next_drop_log_ = now + std::chrono::seconds(10);
    }
  }

  bool acceptedHere(int fd) const {
    int type = 0, listening = 1;
    socklen_t n = sizeof type;
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &n) != 0 || type != SOCK_STREAM) return false;
    n = sizeof listening;
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &n) != 0 || listening != 0) return false;
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return false;
    int port = -1;
    if (a.ss_family == AF_INET) port = ntohs(reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
    if (a.ss_family == AF_INET6) port = ntohs(reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port);
    return port == bound_port_;
  }

  // ----------------------------------------------------- dealer events ---

  void handleMonitor(Link& p, size_t k) {
    Stream& s = p.streams[k];
    while (true) {
      zmq::message_t event, addr;
      if (!s.monitor->recv(event, zmq::recv_flags::dontwait)) return;
      if (!s.monitor->recv(addr, zmq::recv_flags::dontwait)) return;
      uint16_t id;
      std::memcpy(&id, event.data(), sizeof id);
      if (id == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        // A new connection, ready for messages (the TCP-level CONNECTED
        // event comes before the ZMTP/Curve handshake, when a send would be
        // dropped). Whatever was in flight on an old one may be lost: say
        // hello again; once welcomed, resend what went on the old one.
        s.handshaken = true;
        s.failed_handshakes = 0;
        sendHello(p, k);
      } else if (id == ZMQ_EVENT_CONNECTED) {
        uint32_t fd;  // the event's value (HANDSHAKE_SUCCEEDED's is 0)
        std::memcpy(&fd, static_cast<const uint8_t*>(event.data()) + sizeof id, sizeof fd);
        s.fd = int(fd);
      } else if (id == ZMQ_EVENT_DISCONNECTED) {
        // What went on it may be lost: the other streams carry it now
        // (always: a chunk may have gone on it while a stale Welcome said
        // it was welcomed; requeueing costs nothing if none did).
        if (s.welcomed && peers_.at(p.index).stopped.empty() && !stop_.load()) {
          log("stream " + std::to_string(k) + " to '" + p.name + "' disconnected: its unacknowledged chunks go again");
        }
        rounds_.streamLost(p.index, int(k));
        s.welcomed = false;
        s.fd = -1;
        // The peer closing connection after connection before their
        // CurveZMQ handshake passed: its keys are not what this job's
        // config says (a server that cannot decrypt our hello just closes).
        if (!s.handshaken && ++s.failed_handshakes == 3) {
          peers_.trouble(p.index, "its endpoint closes every connection before the CurveZMQ handshake passes (does "
                                  "it run with the secret key of the public key this job's config lists for it?)");
        }
        s.handshaken = false;
      } else if (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        refusedBy("site '" + p.name + "' refused our CurveZMQ key: it does not list this site's "
                  "public key (check both sites' key files and configs)");
      } else if (id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        peers_.trouble(p.index, "the CurveZMQ handshake with its endpoint fails (does it run with the secret key "
                                "of the public key this job's config lists for it?)");
      }
    }
  }

  void sendHello(Link& p, size_t k) {
    Stream& s = p.streams[k];
    HelloFields f;
    f.protocol_version = opt_.test_protocol_version;
    f.job_id = opt_.job_id;
    f.site = opt_.site;
    f.jurisdiction = opt_.sites[self_].jurisdiction;
    f.config_fingerprint.assign(opt_.config_fingerprint.begin(), opt_.config_fingerprint.end());
    f.incarnation = incarnation_;
    f.stream = uint32_t(k);
    // A new Hello on this stream: what went on it before may be lost (its
    // connection is new), and the others carry it until it is welcomed.
    if (s.welcomed) rounds_.streamLost(p.index, int(k));
    s.welcomed = false;
    // Not sent (no ready connection yet): the next timer tick tries again.
    s.hello_sent = sendEnvelope(*s.dealer, helloEnvelope(f), nullptr) ? Clock::now() : Clock::time_point{};
  }

  bool receiveDealer(Link& p, Stream& s) {
    zmq::message_t frame;
    if (!s.dealer->recv(frame, zmq::recv_flags::dontwait)) return false;
    dropRest(*s.dealer, frame);
    const FrameView view{frame.data(), frame.size()};
    Message m;
    const std::string malformed = parseMessage(&view, 1, &m);
    if (!malformed.empty()) {
      log("malformed message from " + p.name + " (" + malformed + "): ignored");
      return true;
    }
    const wire::Envelope& env = m.envelope;
    // Any valid answer is a sign of life (this connection is authenticated
    // by the peer's key), though only its Hello on our ROUTER starts the
    // clock of its silence.
    peers_.heard(p.index, Clock::now());
    Effects fx;
    switch (env.body_case()) {
      case wire::Envelope::kWelcome: {
        const std::string refusal = checkWelcome(env.welcome(), p.name);
        if (!refusal.empty()) {
          refusedBy(refusal);
          break;
        }
        {
          // The Welcome names the peer's life. If it is a new one, its old
          // life's payloads are void now: waiting for its Hello to reach our
          // ROUTER, a round of ours could complete meanwhile with the old
          // life's payload and this site's Ack from the new life (seen
          // under load: Gateway.APayloadFromARestartedSitesPreviousLifeIsVoid).
          const uint64_t life = env.welcome().incarnation();
          const HelloLife l = life != 0 ? peers_.life(p.index, life) : HelloLife::kSame;
          if (l != HelloLife::kSame) rounds_.newLife(p.index, life, l == HelloLife::kRestarted, fx);
        }
        if (!s.welcomed && !s.test_cut) {
          s.welcomed = true;
          peers_.trouble(p.index, "");
          rounds_.welcomed(p.index, int(&s - p.streams.data()));
        }
        break;
      }
      case wire::Envelope::kAck:
        rounds_.ack(p.index, {env.ack().round(), env.ack().tag()});
        break;
      case wire::Envelope::kNack:
        rounds_.nack(p.index, {env.nack().round(), env.nack().tag()}, env.nack().index());
        break;
      case wire::Envelope::kRefuse:
        rounds_.refused(p.index, peers_.at(p.index).incarnation, {env.refuse().round(), env.refuse().tag()},
                        env.refuse().reason(), fx);
        break;
      case wire::Envelope::kClosed:
        // An answer to an earlier life of this gateway says nothing of this one.
        if (env.closed().incarnation() == incarnation_) {
          rounds_.closed(p.index, {env.closed().round(), env.closed().tag()}, fx);
        }
        break;
      default:
        log("unexpected message from " + p.name + " on its reply channel: ignored");
    }
    // Our answers to answers (a Closed for a refusal that came after this
    // site completed the round) go on this connection, to the peer's ROUTER.
    for (const wire::Envelope& e : fx.replies) sendEnvelope(*s.dealer, e, nullptr);
    fx.replies.clear();
    apply(fx, nullptr);
    return true;
  }

  // ------------------------------------------------------ router side ---

  void dropRest(zmq::socket_t& s, zmq::message_t& last) {
    while (last.more()) {
      if (!s.recv(last, zmq::recv_flags::dontwait)) break;
    }
  }

  bool receiveRouter() {
    zmq::message_t id, frame;
    if (!router_->recv(id, zmq::recv_flags::dontwait)) return false;
    if (!id.more()) return true;
    if (!router_->recv(frame, zmq::recv_flags::dontwait)) return true;
    if (!handshakes_.empty()) {
      // A message: its connection finished its handshake.
      const int fd = zmq_msg_get(frame.handle(), ZMQ_SRCFD);
      if (fd >= 0) handshakes_.finished(fd);
    }
    zmq::message_t data;
    bool has_data = false;
    if (frame.more()) {
      has_data = router_->recv(data, zmq::recv_flags::dontwait).has_value();
      if (has_data) dropRest(*router_, data);
    }
    const std::string routing = id.to_string();
    const std::array<FrameView, 2> views = {FrameView{frame.data(), frame.size()}, FrameView{data.data(), data.size()}};
    Message m;
    const std::string malformed = parseMessage(views.data(), has_data ? 2 : 1, &m);
    if (!malformed.empty()) {
      log("malformed message from connection '" + routing + "' (" + malformed + "): ignored");
      return true;
    }
    const wire::Envelope& env = m.envelope;
    if (env.body_case() == wire::Envelope::kHello) {
      handleHello(routing, frame, env.hello());
      return true;
    }
    const auto conn = conns_.find(routing);
    if (conn == conns_.end()) {
      return true;  // no welcomed Hello on this connection (or a newer one of its site took over): ignore
    }
    const size_t site = conn->second.site;
    const PeerState& p = peers_.at(site);
    if (!opt_.insecure) {
      // The binding was made under this connection's key; check it anyway.
      const char* user = zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "User-Id");
      if (user == nullptr || p.name != user) {
        log("dropped a message on the connection of '" + p.name + "' from the key of '" + (user ? user : "?") + "'");
        return true;
      }
    }
    const auto now = Clock::now();
    peers_.heard(site, now);
    if (env.body_case() == wire::Envelope::kStopped) {
      if (env.stopped().incarnation() == p.incarnation && p.stopped.empty()) {
        const std::string why = env.stopped().reason().substr(0, kMaxReasonBytes);
        peers_.stopped(site, env.stopped().incarnation(), why);
        log("site '" + p.name + "' stopped: " + why);
      }
      return true;
    }
    if (env.body_case() == wire::Envelope::kClosed) {
      // A site that completed a round with our payload before our refusal
      // of its own reached it (RoundTable::refused): we parted.
      if (env.closed().incarnation() == incarnation_) {
        Effects fx;
        rounds_.closed(site, {env.closed().round(), env.closed().tag()}, fx);
        apply(fx, &routing);
      }
      return true;
    }
    if (env.body_case() == wire::Envelope::kChunk) {
      if (!m.has_data) {
        reply(routing, refuseEnvelope(env.chunk().round(), env.chunk().tag(), "chunk without a data frame"));
        return true;
      }
      Effects fx;
      rounds_.chunk(site, p.incarnation, env.chunk(), static_cast<const uint8_t*>(data.data()), data.size(), now, fx);
      apply(fx, &routing);
    }
    return true;
  }

  void handleHello(const std::string& routing, const zmq::message_t& frame, const wire::Hello& h) {
    const char* user = opt_.insecure ? nullptr : zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "User-Id");
    const std::string reason = checkHello(h, user, hello_terms_);
    if (!reason.empty()) {
      log("refused handshake from '" + h.site() + "': " + reason);
      // A peer that authenticated as itself and was refused (another
      // config, version or jurisdiction) cannot take part in this life:
      // rounds stop waiting for it, naming why.
      const long site = peers_.find(h.site());
      if (site >= 0 && (opt_.insecure || (user != nullptr && h.site() == user))) {
        if (peers_.at(size_t(site)).refused.empty()) peers_.refused(size_t(site), reason, Clock::now());
      }
      reply(routing, welcomeEnvelope(opt_.site, incarnation_, reason));
      return;
    }
    const size_t site = size_t(peers_.find(h.site()));  // checkHello: one of the peers
    // This connection speaks for the site's stream from now on; an older
    // one of the same stream (half-open after a partition), or of any
    // stream of another life of the site (a restart), no longer does.
    for (auto it = conns_.begin(); it != conns_.end();) {
      const bool replaced = it->second.site == site &&
                            (it->second.stream == h.stream() || it->second.incarnation != h.incarnation());
      it = replaced ? conns_.erase(it) : std::next(it);
    }
    conns_[routing] = Conn{site, h.stream(), h.incarnation()};
    const HelloLife life = peers_.hello(site, h.incarnation(), Clock::now());
    if (life != HelloLife::kSame) {
      // What it lost is resent when our DEALER reconnects and is welcomed
      // again (handleMonitor, receiveDealer).
      Effects fx;
      rounds_.newLife(site, h.incarnation(), life == HelloLife::kRestarted, fx);
      apply(fx, nullptr);
    }
    reply(routing, welcomeEnvelope(opt_.site, incarnation_, ""));
  }

  void reply(const std::string& routing, const wire::Envelope& env) {
    std::string bytes = env.SerializeAsString();
    try {
      router_->send(zmq::buffer(routing), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      router_->send(zmq::buffer(bytes), zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      // EHOSTUNREACH: the peer's connection is gone; it will hello again.
      if (e.num() != EHOSTUNREACH) throw;
    }
  }

  bool sendEnvelope(zmq::socket_t& s, const wire::Envelope& env, zmq::message_t* data) {
    std::string bytes = env.SerializeAsString();
    zmq::message_t head(bytes.data(), bytes.size());
    auto flags = zmq::send_flags::dontwait | (data ? zmq::send_flags::sndmore : zmq::send_flags::none);
    if (!s.send(head, flags)) return false;
    if (data) s.send(*data, zmq::send_flags::none);  // the second frame follows atomically
    return true;
  }

  // ----------------------------------------------------------- rounds ---

  void takeCommands() {
    std::deque<Command> cmds;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cmds.swap(commands_);
    }
    for (Command& c : cmds) {
      const Key key{c.round, c.tag};
      const std::string refusal = rounds_.open(key, c.kind, std::move(c.payload), Clock::now());
      if (!refusal.empty()) {
        c.promise.set_exception(std::make_exception_ptr(InvalidArgument(refusal)));
        std::lock_guard<std::mutex> lock(mu_);
        releaseSlot(key);
        slots_.notify_all();
        continue;
      }
      promises_[key] = std::move(c.promise);
    }
  }

  // Sends as many chunks as the sockets take, round-robin over rounds.
  void sendChunks() {
    for (Link& p : links_) {
      if (!p.welcomed()) continue;
      rounds_.send(p.index, [&](const ChunkToSend& c) { return sendChunk(p, c); });
    }
  }

  // Puts the chunk on the first welcomed stream of `p` that takes it, from
  // firstStream() on: the stream, or RoundTable::kFull.
  int sendChunk(Link& p, const ChunkToSend& c) {
    const uint8_t* bytes = c.payload->data() + c.offset;
    ChunkHeader h;
    h.round = c.key.first;
    h.tag = c.key.second;
    h.incarnation = incarnation_;
    h.index = c.index;
    h.count = c.count;
    h.total_bytes = c.payload->size();
    h.xxh3 = chunkChecksum(bytes, c.bytes);
    h.kind = uint32_t(c.kind);
    zmq::message_t data;
    if (!c.retry && opt_.test_corrupt_chunk == int64_t(c.index) && c.bytes > 0) {
      data.rebuild(bytes, c.bytes);
      static_cast<uint8_t*>(data.data())[c.bytes / 2] ^= 0x5a;
    } else if (c.bytes > 0) {
      // Zero copy: the frame borrows the payload and holds a reference to it.
      auto* hold = new std::shared_ptr<std::vector<uint8_t>>(c.payload);
      data.rebuild(const_cast<uint8_t*>(bytes), c.bytes,
                   [](void*, void* hint) { delete static_cast<std::shared_ptr<std::vector<uint8_t>>*>(hint); },
                   hold);
    }
    const std::string head = chunkEnvelope(h).SerializeAsString();
    const int k = putOnAStream(c, p.streams.size(), [&](size_t on) {
      Stream& s = p.streams[on];
      if (!s.welcomed) return false;
      zmq::message_t first(head.data(), head.size());
      if (!s.dealer->send(first, zmq::send_flags::dontwait | zmq::send_flags::sndmore)) return false;  // full
      s.dealer->send(data, zmq::send_flags::none);  // the second frame follows atomically
      return true;
    });
    if (k != RoundTable::kFull) cutForTest(p, size_t(k), c.index);
    return k;
  }

  // Test hook (GatewayOptions::test_cut_stream): the TCP connection of
  // stream 1 is shut down right after the first chunk with an index of at
  // least `test_cut_stream` that goes on it (chunk i goes on stream i mod
  // streams: with 4 streams and 800, chunk 801), so the chunks queued
  // behind it are lost, and the stream is not used again: the others must
  // carry them.
  void cutForTest(Link& p, size_t k, uint32_t index) {
    if (opt_.test_cut_stream < 0 || k != 1 || index < uint64_t(opt_.test_cut_stream) || cut_done_) return;
    Stream& s = p.streams[k];
    if (s.fd < 0) return;
    cut_done_ = true;
    s.test_cut = true;
    log("test: cutting the connection of stream 1 to '" + p.name + "' after chunk " + std::to_string(index));
    ::shutdown(s.fd, SHUT_RDWR);
  }

  void timers() {
    const auto now = Clock::now();
    for (Link& p : links_) {
      for (size_t k = 0; k < p.streams.size(); ++k) {
        Stream& s = p.streams[k];
        if (now - s.last_heartbeat < opt_.heartbeat) continue;
        s.last_heartbeat = now;
        if (s.welcomed) {
          sendEnvelope(*s.dealer, heartbeatEnvelope(incarnation_), nullptr);
        } else if (!fatal_ && now - s.hello_sent >= opt_.heartbeat * 2) {
          sendHello(p, k);  // no Welcome yet (peer not up, or the Hello was lost)
        }
      }
    }
    for (size_t i : peers_.tick(now)) {
      log("site '" + opt_.sites[i].name + "' is back after a silence (same incarnation: the link, not the site, was lost)");
      std::lock_guard<std::mutex> lock(mu_);
      if (returned_.size() < 64) returned_.push_back(opt_.sites[i].name);  // bounded if nobody asks
    }
    // Rounds peers have opened and this site has not (a restarted site's
    // join request, a peer running ahead), for peerRounds(): every 20 ms.
    const bool refresh = now >= next_opened_;
    std::vector<PeerRound> opened;
    if (refresh) {
      next_opened_ = now + std::chrono::milliseconds(20);
      opened = rounds_.openedByPeers();
    }
    std::vector<std::string> live = peers_.live(now);
    std::lock_guard<std::mutex> lock(mu_);
    live_.swap(live);
    if (refresh) opened_.swap(opened);
  }

  void writeMetrics(const RoundResult& res) {
    if (opt_.metrics_path.empty()) return;
    std::ofstream out(opt_.metrics_path, std::ios::app);
    for (const PeerMetrics& m : res.peers) {
      out << "{\"site\": " << jsonString(opt_.site) << ", \"peer\": " << jsonString(m.site)
          << ", \"round\": " << res.round << ", \"tag\": " << jsonString(res.tag)
          << ", \"bytes_sent\": " << m.bytes_sent
          << ", \"bytes_received\": " << m.bytes_received << ", \"retransmissions\": " << m.retransmissions
          << ", \"goodput_mbps\": " << m.goodput_mbps << ", \"round_seconds\": " << res.seconds
          << ", \"missing\": " << (m.missing ? "true" : "false") << "}\n";
    }
  }

  // ------------------------------------------------------------ errors ---

  // A peer refused us: a configuration error no retry fixes. Every pending
  // and later exchange fails with the reason, but the I/O thread keeps
  // running, so this site still answers the handshakes of others (who then
  // learn their own refusal instead of waiting for a site that went away).
  void refusedBy(const std::string& why) {
    if (fatal_) return;
    const auto e = std::make_exception_ptr(ProtocolError(why));
    setFatal(e, why);
    Effects fx;
    rounds_.failAll(e, false, fx);
    apply(fx, nullptr);
    std::deque<Command> cmds;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cmds.swap(commands_);
    }
    for (Command& c : cmds) c.promise.set_exception(e);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Command& c : cmds) releaseSlot({c.round, c.tag});
    }
    slots_.notify_all();
  }

  // Under mu_: an exchange ended; it frees its slot unless it had none.
  void releaseSlot(const Key& key) {
    if (!unslotted_.erase(key)) --open_rounds_;
    open_keys_.erase(key);
  }

  void rethrowFatal() {
    if (fatal_) std::rethrow_exception(fatal_);
  }

  void setFatal(std::exception_ptr e, const std::string& what) {
    log("fatal: " + what);
    std::lock_guard<std::mutex> lock(mu_);
    fatal_ = e;
    fatal_what_ = what;
    slots_.notify_all();
  }

  void failAll(const std::string& why) {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      e = fatal_ ? fatal_ : std::make_exception_ptr(Error("gateway '" + opt_.site + "': " + why));
      for (Command& c : commands_) c.promise.set_exception(e);
      commands_.clear();
    }
    Effects fx;
    rounds_.failAll(e, true, fx);
    for (auto& f : fx.failed) settle(f.first, nullptr, f.second);
    for (auto& kv : promises_) kv.second.set_exception(e);  // delivered rounds have none left
    promises_.clear();
  }

  // -------------------------------------------------------------- logs ---

  void log(const std::string& line) const {
    const std::string& name = opt_.log_name.empty() ? opt_.site : opt_.log_name;
    std::fprintf(stderr, "strait gateway %s: %s\n", name.c_str(), line.c_str());
  }

  GatewayOptions opt_;
  size_t self_ = 0;
  EgressGuard egress_;  // thread-safe
  HelloTerms hello_terms_;  // what peers' Hellos are checked against
  uint64_t incarnation_ = 0;
  int wake_fd_ = -1;
  std::thread io_;
  std::atomic<bool> stop_{false};

  // Shared with API threads, under mu_.
  mutable std::mutex mu_;
  std::condition_variable slots_;
  int open_rounds_ = 0;
  std::deque<Command> commands_;
  std::set<Key> unslotted_;  // open exchanges that hold no slot (join messages)
  std::set<Key> open_keys_;  // (round, tag) of open exchanges: at most max_rounds_in_flight
  std::exception_ptr fatal_;
  std::string fatal_what_;
  std::string stop_reason_;  // what the Stopped messages say (Gateway::stop)
  std::vector<std::string> live_;
  std::vector<PeerRound> opened_;
  std::vector<std::string> returned_;  // for takeReturnedPeers(), at most a few per peer
  std::vector<std::string> diverged_;  // for takeDivergedPeers(), each site once
  std::vector<std::vector<uint8_t>> pool_;  // recycled receive buffers, at most poolLimit()

  // I/O thread only.
  PeerTable peers_;
  RoundTable rounds_;
  std::map<Key, std::promise<RoundResult>> promises_;  // this site's rounds not settled yet
  // The ROUTER's connections that speak for a site (routing id -> site,
  // stream, life): the one whose Hello was welcomed last, at most one per
  // site and stream.
  std::map<std::string, Conn> conns_;
  // At least two I/O threads, so sending and receiving proceed in parallel;
  // more with several streams (ioThreads).
  zmq::context_t ctx_{ioThreads(opt_)};
  bool cut_done_ = false;  // test_cut_stream: done once
  std::unique_ptr<zmq::socket_t> router_;
  std::unique_ptr<zmq::socket_t> zap_;
  std::unique_ptr<zmq::socket_t> router_monitor_;
  int bound_port_ = -1;
  // Every peer's streams connect at once at the start and after a
  // partition: room for all of them twice over, and never below the floor.
  PendingHandshakes handshakes_{std::max(kMaxPendingHandshakes,
                                         2 * size_t(opt_.streams) * (opt_.sites.size() - 1))};
  size_t dropped_ = 0;  // since the last log line about it
  Clock::time_point next_drop_log_{};
  std::vector<Link> links_;
  Clock::time_point next_opened_{};
};

Gateway::Gateway(GatewayOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Gateway::~Gateway() = default;

void Gateway::stop(const std::string& reason) { impl_->stop(reason); }

std::future<RoundResult> Gateway::exchange(uint64_t round, const std::string& tag, std::vector<uint8_t> payload,
                                           core::MessageKind kind) {
  return impl_->exchange(round, tag, std::move(payload), kind);
}
double Gateway::privatize(float* x, size_t n, double norm) { return impl_->privatize(x, n, norm); }
double Gateway::chargePrivacyRelease() { return impl_->chargePrivacyRelease(); }
double Gateway::privacySpent() const { return impl_->privacySpent(); }
uint64_t Gateway::privacyReleases() const { return impl_->privacyReleases(); }
std::string Gateway::auditHead() const { return impl_->auditHead(); }
uint64_t Gateway::auditRecords() const { return impl_->auditRecords(); }
size_t Gateway::siteIndex() const { return impl_->self(); }
bool Gateway::waitForSlot(std::chrono::milliseconds within) { return impl_->waitForSlot(within); }
const GatewayOptions& Gateway::options() const { return impl_->options(); }
std::vector<std::string> Gateway::livePeers() const { return impl_->livePeers(); }
std::vector<PeerRound> Gateway::peerRounds(const std::string& prefix) const { return impl_->peerRounds(prefix); }
std::vector<std::string> Gateway::takeReturnedPeers() { return impl_->takeReturnedPeers(); }
std::vector<std::string> Gateway::takeDivergedPeers() { return impl_->takeDivergedPeers(); }
void Gateway::recycle(std::vector<uint8_t> buffer) { impl_->recycle(std::move(buffer)); }

}  // namespace strait::transport
