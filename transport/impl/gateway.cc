// The site gateway's I/O thread: sockets, handshake, chunking, liveness.
// docs/PROTOCOL.md ("Gateway protocol") is the contract; this file is one
// implementation of it.
//
// Sockets (all owned by the I/O thread):
//   router_   bound at this site's endpoint; receives every peer's DEALER
//             (Hello, Heartbeat, Chunk) and answers on it (Welcome, Ack,
//             Nack, Refuse). CurveZMQ server.
//   dealers_  one per peer, connected to the peer's ROUTER; we send our
//             Hello, heartbeats and payload chunks there. CurveZMQ client.
//   zap_      the ZAP handler (RFC 27): admits only the job's public keys.
//   monitors  one per DEALER: reconnects trigger a new Hello and a resend.
// exchange() talks to the thread through a mutex-guarded queue and an eventfd.

#include "transport/gateway.h"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
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
#include <sstream>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "core/error.h"
#include "core/json.h"
#include "core/codec/codec.h"
#include "transport/audit.h"
#include "transport/checksum.h"
#include "transport/impl/frame.h"
#include "transport/privacy.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {

namespace {

using Clock = std::chrono::steady_clock;
using Key = std::pair<uint64_t, std::string>;  // (round, tag)

using core::MessageKind;
constexpr size_t kMaxRefusedKeys = 256;  // refusals remembered for rounds not opened yet

double secondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool isLoopback(const std::string& endpoint) {
  const std::string rest = endpoint.substr(endpoint.find("://") == std::string::npos ? 0 : endpoint.find("://") + 3);
  const std::string host = rest.substr(0, rest.rfind(':'));
  return host == "localhost" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

// Our payload on its way to one peer.
struct Outgoing {
  uint32_t next = 0;              // next chunk of the first pass
  std::deque<uint32_t> resend;    // chunks asked for again (Nack), each at most once
  std::vector<bool> queued;       // which chunks are in `resend`: bounds it by the chunk count
  bool acked = false;
  bool abandoned = false;         // the round finished without this peer
  bool refused = false;           // the peer refused it (continue: the round goes on without it)
  bool closed = false;            // the peer ended the round without it (Closed): the sites parted
};

// A peer's payload being reassembled.
struct Incoming {
  uint64_t incarnation = 0;
  uint64_t total = 0;
  uint32_t count = 0;
  std::vector<uint8_t> data;
  std::vector<bool> have;
  uint32_t have_count = 0;
  uint32_t kind = 0;  // as the sender declared it
  bool complete = false;
  Clock::time_point done_at;
};

struct Round {
  Key key;
  bool local = false;  // exchange() was called for it (else: a peer ran ahead)
  MessageKind kind = MessageKind::kModelUpdate;
  std::shared_ptr<std::vector<uint8_t>> payload;
  uint32_t chunk_count = 0;
  std::vector<Outgoing> out;  // per site (own index unused)
  std::vector<Incoming> in;   // per site (own index unused)
  std::vector<bool> in_refused;  // per site: this site refused its payload (continue: not waited for)
  std::vector<PeerMetrics> metrics;  // per site

  // Site i refused our payload or we refused its: both sides leave the
  // other's payload out of this round, so they use the same set.
  bool refusedEitherWay(size_t i) const { return out[i].refused || in_refused[i]; }
  std::promise<RoundResult> promise;
  bool completed = false;     // promise fulfilled
  std::string failure;        // set when a peer refused our payload
  Clock::time_point start;
  Clock::time_point next_wait_log;
  bool said_waiting = false;  // "waiting for" logged once already
};

// The model-update rounds of one tag that this site completed without one
// peer (missing, not refused), in one life of that peer, as spans of round
// numbers: [lo, hi] by lo. Kept as long as the gateway runs (at most
// kMaxLeftOutSpans spans; a freeze of any length is one span), because a
// peer that froze can wake any number of rounds behind: its late chunks for
// these rounds are answered with Closed, never Ack.
struct LeftOut {
  uint64_t incarnation = 0;  // the peer's life then; 0: never heard (any life)
  std::map<uint64_t, uint64_t> spans;
  bool told = false;         // the parting logged and noted once already

  bool has(uint64_t round, uint64_t life) const {
    if (incarnation != 0 && incarnation != life) return false;
    auto it = spans.upper_bound(round);
    return it != spans.begin() && std::prev(it)->second >= round;
  }

  void add(uint64_t round) {
    auto next = spans.upper_bound(round);
    auto at = next == spans.begin() ? spans.end() : std::prev(next);
    if (at != spans.end() && (round <= at->second || round - at->second == 1)) {
      at->second = std::max(at->second, round);  // in the span before, or just after it
    } else {
      at = spans.emplace_hint(next, round, round);
    }
    if (next != spans.end() && next->first == at->second + 1) {  // now touches the next span
      at->second = next->second;
      spans.erase(next);
    }
  }
};
constexpr size_t kMaxLeftOutSpans = 256;

struct Peer {
  size_t index = 0;
  std::string name;
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<zmq::socket_t> monitor;
  bool welcomed = false;              // our Hello accepted by its ROUTER
  Clock::time_point hello_sent;
  uint64_t incarnation = 0;           // its gateway's, from its Hello to us
  bool greeted = false;               // its Hello to our ROUTER was accepted
  Clock::time_point last_heard{};     // any valid message from it
  Clock::time_point last_heartbeat{};
  bool lost = false;                  // silent for peer_timeout after its handshake
  uint64_t lost_incarnation = 0;      // its incarnation when it went silent
};

struct Command {
  uint64_t round;
  std::string tag;
  MessageKind kind;
  std::shared_ptr<std::vector<uint8_t>> payload;
  std::promise<RoundResult> promise;
};

}  // namespace

class Gateway::Impl {
 public:
  explicit Impl(GatewayOptions options) : opt_(std::move(options)) {
    validate();
    hello_terms_.job_id = opt_.job_id;
    hello_terms_.self = opt_.site;
    for (size_t i = 0; i < opt_.sites.size(); ++i) {
      if (i == self_) continue;
      hello_terms_.peers.push_back(opt_.sites[i].name);
      hello_terms_.jurisdictions.push_back(opt_.sites[i].jurisdiction);
    }
    hello_terms_.config_fingerprint.assign(opt_.config_fingerprint.begin(), opt_.config_fingerprint.end());
    hello_terms_.curve = !opt_.insecure;
    if (!opt_.audit_log.empty()) {
      audit_ = std::make_unique<AuditLog>(opt_.audit_log, opt_.site, opt_.sites[self_].jurisdiction, opt_.signing_key);
      if (opt_.privacy.enabled && audit_->epsilonRecorded() > 0) {
        // Continue the budget where the site's previous runs left it: the
        // fewest releases that account for the largest spend recorded.
        const auto& pr = opt_.privacy;
        const double recorded = audit_->epsilonRecorded();
        uint64_t k = 1;
        while (gaussianEpsilon(pr.noise_multiplier, k, pr.delta) < recorded * (1 - 1e-9) && k < (uint64_t{1} << 32)) {
          k = k < 1024 ? k + 1 : k + k / 64;
        }
        releases_ = k;
        spent_ = gaussianEpsilon(pr.noise_multiplier, k, pr.delta);
        log("privacy: the audit log records epsilon " + fmt(recorded) + " already spent; continuing from " +
            std::to_string(k) + " releases (epsilon " + fmt(spent_) + " of the budget " + fmt(pr.epsilon_budget) + ")");
      }
    } else if (opt_.privacy.enabled) {
      log("privacy: no audit log, so the epsilon spent is counted from zero in every run of this gateway");
    }
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
    checkEgress(round, tag, payload, kind);
    std::unique_lock<std::mutex> lock(mu_);
    rethrowFatal();
    if (!open_keys_.insert({round, tag}).second) {
      fail<InvalidArgument>("exchange: round ", round, " tag '", tag, "' is already in flight");
    }
    if (audit_) {
      // Write-ahead: the records are on disk before anything can leave. A
      // failure (a full disk) fails this call and nothing is sent.
      lock.unlock();
      try {
        auditPayload("out", round, tag, payload.data(), payload.size(), kind, nullptr);
      } catch (...) {
        lock.lock();
        open_keys_.erase({round, tag});
        throw;
      }
      lock.lock();
    }
    const auto deadline = Clock::now() + opt_.hard_deadline;
    while (open_rounds_ >= opt_.max_rounds_in_flight) {
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
    ++open_rounds_;
    Command c{round, tag, kind, std::make_shared<std::vector<uint8_t>>(std::move(payload)), {}};
    auto future = c.promise.get_future();
    commands_.push_back(std::move(c));
    lock.unlock();
    wake();
    return future;
  }

  // ------------------------------------------------------------- policy ---

  void checkEgress(uint64_t round, const std::string& tag, const std::vector<uint8_t>& payload, MessageKind kind) {
    const bool allowed =
        std::find(opt_.egress_allow.begin(), opt_.egress_allow.end(), kind) != opt_.egress_allow.end();
    std::string why;
    if (!allowed) {
      std::string list;
      for (MessageKind k : opt_.egress_allow) list += (list.empty() ? "" : ", ") + std::string(core::messageKindName(k));
      why = std::string("egress policy") + (opt_.policy_source.empty() ? "" : " (" + opt_.policy_source + ")") +
            " of site '" + opt_.site + "' does not allow '" + core::messageKindName(kind) +
            "' to leave; allowed: " + (list.empty() ? "nothing" : list);
    } else if (kind == MessageKind::kModelUpdate && opt_.privacy.enabled) {
      std::lock_guard<std::mutex> lock(priv_mu_);
      if (privatized_ == 0) {
        why = "privacy policy" + (opt_.policy_source.empty() ? "" : " (" + opt_.policy_source + ")") + " of site '" +
              opt_.site + "': a model update must be privatized (clipped and noised) before it leaves";
      } else {
        --privatized_;
      }
    }
    if (why.empty()) return;
    log("refused round " + std::to_string(round) + " '" + tag + "': " + why);
    if (audit_) {
      AuditEvent e;
      e.event = "refused";
      e.round = round;
      e.tag = tag;
      e.peer = "*";
      e.kind = core::messageKindName(kind);
      e.bytes = payload.size();
      e.digest = digestHex(payload.data(), payload.size());
      e.reason = why;
      audit_->append(e);
    }
    fail<PolicyViolation>(why);
  }

  // One record per peer (out) or for one peer (in).
  void auditPayload(const char* event, uint64_t round, const std::string& tag, const uint8_t* data, size_t size,
                    MessageKind kind, const Peer* only) {
    AuditEvent e;
    e.event = event;
    e.round = round;
    e.tag = tag;
    e.kind = core::messageKindName(kind);
    e.bytes = size;
    e.digest = digestHex(data, size);
    try {
      const core::PayloadInfo info = core::inspectPayload(data, size);
      e.codec = info.structure + "/" + info.values;
    } catch (const std::exception&) {
      e.codec = "";  // not a codec payload (a framed message, a description)
    }
    if (opt_.privacy.enabled) {
      std::lock_guard<std::mutex> lock(priv_mu_);
      e.epsilon = spent_;
      e.delta = opt_.privacy.delta;
    }
    for (size_t i = 0; i < opt_.sites.size(); ++i) {
      if (i == self_ || (only != nullptr && only->index != i)) continue;
      e.peer = opt_.sites[i].name;
      e.peer_jurisdiction = opt_.sites[i].jurisdiction;
      audit_->append(e);
    }
  }

  double privatize(float* x, size_t n) {
    if (!opt_.privacy.enabled) {
      fail<InvalidArgument>("privatize: site '", opt_.site, "' has no privacy section in its policy");
    }
    std::lock_guard<std::mutex> lock(priv_mu_);
    const auto& pr = opt_.privacy;
    const double next = gaussianEpsilon(pr.noise_multiplier, releases_ + 1, pr.delta);
    if (next > pr.epsilon_budget) {
      const std::string why = "privacy budget of site '" + opt_.site + "' exhausted: release " +
                              std::to_string(releases_ + 1) + " would bring epsilon to " + std::to_string(next) +
                              " > budget " + std::to_string(pr.epsilon_budget) + " (delta " +
                              std::to_string(pr.delta) + ", sigma " + std::to_string(pr.noise_multiplier) +
                              "); spent so far: " + std::to_string(spent_);
      log(why);
      fail<PolicyViolation>(why);
    }
    clipAndNoise(x, n, pr.clip_norm, pr.noise_multiplier);
    ++releases_;
    ++privatized_;
    spent_ = next;
    return spent_;
  }

  double privacySpent() const {
    std::lock_guard<std::mutex> lock(priv_mu_);
    return spent_;
  }
  uint64_t privacyReleases() const {
    std::lock_guard<std::mutex> lock(priv_mu_);
    return releases_;
  }
  std::string auditHead() const { return audit_ ? audit_->head() : ""; }
  uint64_t auditRecords() const { return audit_ ? audit_->records() : 0; }

  void recycle(std::vector<uint8_t> buffer) {
    if (buffer.capacity() == 0) return;
    buffer.resize(buffer.capacity());  // keep it sized: a later resize down is free
    std::lock_guard<std::mutex> lock(mu_);
    if (pool_.size() < poolLimit()) pool_.push_back(std::move(buffer));
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
  // empty one that handleChunk grows as chunks arrive.
  std::vector<uint8_t> recycledBuffer(uint64_t bytes) {
    std::vector<uint8_t> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < pool_.size(); ++i) {
        if (pool_[i].size() >= bytes) {
          out = std::move(pool_[i]);
          pool_.erase(pool_.begin() + long(i));
          out.resize(bytes);  // within its capacity: no allocation
          break;
        }
      }
    }
    return out;
  }

  // ------------------------------------------------------------- setup ---

  void validate() {
    if (opt_.sites.empty()) fail<InvalidArgument>("gateway: no sites");
    self_ = opt_.sites.size();
    for (size_t i = 0; i < opt_.sites.size(); ++i) {
      if (opt_.sites[i].name == opt_.site) self_ = i;
    }
    if (self_ == opt_.sites.size()) fail<InvalidArgument>("gateway: site '", opt_.site, "' is not a site of the job");
    if (opt_.chunk_bytes == 0) fail<InvalidArgument>("gateway: chunk_bytes must be > 0");
    if (opt_.max_rounds_in_flight < 1) fail<InvalidArgument>("gateway: max_rounds_in_flight must be >= 1");
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
  }

  void setCommon(zmq::socket_t& s) {
    s.set(zmq::sockopt::linger, 0);
    s.set(zmq::sockopt::sndhwm, opt_.high_water_mark);
    s.set(zmq::sockopt::rcvhwm, opt_.high_water_mark);
    // ZMTP heartbeats: a silent TCP connection is dropped and re-established.
    s.set(zmq::sockopt::heartbeat_ivl, static_cast<int>(opt_.heartbeat.count()));
    s.set(zmq::sockopt::heartbeat_timeout, static_cast<int>(opt_.peer_timeout.count()));
    s.set(zmq::sockopt::heartbeat_ttl, static_cast<int>(std::min<int64_t>(opt_.peer_timeout.count(), 6553500)));
    // A single frame never exceeds a chunk plus its envelope.
    s.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(opt_.chunk_bytes + 65536));
  }

  void openSockets() {
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
    const SiteEndpoint& self = opt_.sites[self_];
    const std::string& me = self.bind.empty() ? self.endpoint : self.bind;
    try {
      router_->bind(me);
    } catch (const zmq::error_t& e) {
      fail<Error>("gateway '", opt_.site, "': cannot listen on ", me, ": ", e.what());
    }
    for (size_t i = 0; i < opt_.sites.size(); ++i) {
      if (i == self_) continue;
      Peer p;
      p.index = i;
      p.name = opt_.sites[i].name;
      p.dealer = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::dealer);
      setCommon(*p.dealer);
      p.dealer->set(zmq::sockopt::immediate, 1);  // queue only to a live connection
      p.dealer->set(zmq::sockopt::reconnect_ivl, 100);
      p.dealer->set(zmq::sockopt::reconnect_ivl_max, 2000);
      // A connect attempt made while the link is down must not sit in TCP's
      // SYN back-off (minutes) after it comes back: retry instead.
      p.dealer->set(zmq::sockopt::connect_timeout, static_cast<int>(opt_.peer_timeout.count()));
      if (!opt_.insecure) {
        p.dealer->set(zmq::sockopt::curve_serverkey, opt_.sites[i].public_key);
        p.dealer->set(zmq::sockopt::curve_publickey, opt_.sites[self_].public_key);
        p.dealer->set(zmq::sockopt::curve_secretkey, opt_.secret_key);
      }
      const std::string mon = "inproc://monitor-" + std::to_string(i);
      if (zmq_socket_monitor(p.dealer->handle(), mon.c_str(),
                             ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED |
                                 ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0) {
        fail<Error>("gateway: cannot monitor socket: ", zmq_strerror(zmq_errno()));
      }
      p.monitor = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::pair);
      p.monitor->set(zmq::sockopt::linger, 0);
      p.monitor->connect(mon);
      p.dealer->connect(opt_.sites[i].endpoint);
      peers_.push_back(std::move(p));
    }
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
      while (!stop_.load()) {
        poll();
        takeCommands();
        sendChunks();
        timers();
        finishRounds();
      }
    } catch (const std::exception& e) {
      setFatal(std::current_exception(), e.what());
    }
    failAll("gateway stopped");
    closeSockets();
  }

  void closeSockets() {
    // Give queued replies (an Ack sent just before shutdown) a bounded time
    // to leave; a peer waiting for it would otherwise wait for nothing.
    const int linger = static_cast<int>(std::min<int64_t>(opt_.peer_timeout.count(), 1000));
    if (router_) router_->set(zmq::sockopt::linger, linger);
    for (Peer& p : peers_) {
      if (p.dealer) p.dealer->set(zmq::sockopt::linger, linger);
    }
    for (Peer& p : peers_) {
      if (p.dealer) zmq_socket_monitor(p.dealer->handle(), nullptr, 0);
      p.monitor.reset();
      p.dealer.reset();
    }
    router_.reset();
    zap_.reset();
    ctx_.close();
  }

  void poll() {
    std::vector<zmq::pollitem_t> items;
    items.push_back({nullptr, wake_fd_, ZMQ_POLLIN, 0});
    items.push_back({router_->handle(), 0, ZMQ_POLLIN, 0});
    if (zap_) items.push_back({zap_->handle(), 0, ZMQ_POLLIN, 0});
    const size_t first_peer = items.size();
    for (Peer& p : peers_) {
      short events = ZMQ_POLLIN;
      if (p.welcomed && hasWork(p.index)) events |= ZMQ_POLLOUT;
      items.push_back({p.dealer->handle(), 0, events, 0});
      items.push_back({p.monitor->handle(), 0, ZMQ_POLLIN, 0});
    }
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(pollTimeoutMs()));
    if (items[0].revents & ZMQ_POLLIN) {
      uint64_t v;
      while (::read(wake_fd_, &v, sizeof v) > 0) {
      }
    }
    if (zap_ && (items[2].revents & ZMQ_POLLIN)) handleZap();
    // Drain in bounded batches so one busy socket cannot starve the others.
    for (int i = 0; i < 256 && (items[1].revents & ZMQ_POLLIN); ++i) {
      if (!receiveRouter()) break;
    }
    for (size_t k = 0; k < peers_.size(); ++k) {
      const zmq::pollitem_t& d = items[first_peer + 2 * k];
      const zmq::pollitem_t& m = items[first_peer + 2 * k + 1];
      if (m.revents & ZMQ_POLLIN) handleMonitor(peers_[k]);
      for (int i = 0; i < 64 && (d.revents & ZMQ_POLLIN); ++i) {
        if (!receiveDealer(peers_[k])) break;
      }
    }
  }

  long pollTimeoutMs() const {
    long ms = std::max<long>(1, std::min<long>(opt_.heartbeat.count() / 2, 50));
    return ms;
  }

  void wake() {
    const uint64_t one = 1;
    ssize_t r = ::write(wake_fd_, &one, sizeof one);
    (void)r;
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

  // ----------------------------------------------------- dealer events ---

  void handleMonitor(Peer& p) {
    while (true) {
      zmq::message_t event, addr;
      if (!p.monitor->recv(event, zmq::recv_flags::dontwait)) return;
      if (!p.monitor->recv(addr, zmq::recv_flags::dontwait)) return;
      uint16_t id;
      std::memcpy(&id, event.data(), sizeof id);
      if (id == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        // A new connection, ready for messages (the TCP-level CONNECTED
        // event comes before the ZMTP/Curve handshake, when a send would be
        // dropped). Whatever was in flight on an old one may be lost: say
        // hello again; once welcomed, resend what is unacknowledged.
        sendHello(p);
      } else if (id == ZMQ_EVENT_DISCONNECTED) {
        p.welcomed = false;
      } else if (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        refusedBy("site '" + p.name + "' refused our CurveZMQ key: it does not list this site's "
                  "public key (check both sites' key files and configs)");
      }
    }
  }

  void sendHello(Peer& p) {
    wire::Envelope env;
    wire::Hello* h = env.mutable_hello();
    h->set_protocol_version(opt_.test_protocol_version);
    h->set_job_id(opt_.job_id);
    h->set_site(opt_.site);
    h->set_jurisdiction(opt_.sites[self_].jurisdiction);
    h->set_config_fingerprint(std::string(opt_.config_fingerprint.begin(), opt_.config_fingerprint.end()));
    h->set_incarnation(incarnation_);
    p.welcomed = false;
    // Not sent (no ready connection yet): the next timer tick tries again.
    p.hello_sent = sendEnvelope(*p.dealer, env, nullptr) ? Clock::now() : Clock::time_point{};
  }

  bool receiveDealer(Peer& p) {
    zmq::message_t frame;
    if (!p.dealer->recv(frame, zmq::recv_flags::dontwait)) return false;
    dropRest(*p.dealer, frame);
    const FrameView view{frame.data(), frame.size()};
    Message m;
    const std::string malformed = parseMessage(&view, 1, &m);
    if (!malformed.empty()) {
      log("malformed message from " + p.name + " (" + malformed + "): ignored");
      return true;
    }
    const wire::Envelope& env = m.envelope;
    switch (env.body_case()) {
      case wire::Envelope::kWelcome: {
        const std::string refusal = checkWelcome(env.welcome(), p.name);
        if (!refusal.empty()) {
          refusedBy(refusal);
          break;
        }
        if (!p.welcomed) {
          p.welcomed = true;
          restartSends(p.index);
        }
        break;
      }
      case wire::Envelope::kAck: {
        auto it = rounds_.find({env.ack().round(), env.ack().tag()});
        if (it != rounds_.end() && it->second.local) it->second.out[p.index].acked = true;
        break;
      }
      case wire::Envelope::kNack: {
        auto it = rounds_.find({env.nack().round(), env.nack().tag()});
        if (it != rounds_.end() && it->second.local && env.nack().index() < it->second.chunk_count) {
          Outgoing& o = it->second.out[p.index];
          const uint32_t index = env.nack().index();
          if (o.queued.size() != it->second.chunk_count) o.queued.assign(it->second.chunk_count, false);
          if (!o.acked && !o.queued[index]) {
            o.queued[index] = true;
            o.resend.push_back(index);
            it->second.metrics[p.index].retransmissions++;
          }
        }
        break;
      }
      case wire::Envelope::kRefuse: {
        auto it = rounds_.find({env.refuse().round(), env.refuse().tag()});
        if (it != rounds_.end() && it->second.local) {
          const std::string why = "site '" + p.name + "' refused our payload: " + env.refuse().reason();
          if (opt_.on_site_loss == OnSiteLoss::kContinue) {
            // The peer goes on without our payload; this site goes on
            // without the peer in this round (it counts as missing).
            Outgoing& o = it->second.out[p.index];
            if (!o.refused) log("round " + std::to_string(it->first.first) + " '" + it->first.second + "': " + why);
            o.refused = true;
            o.abandoned = true;
          } else {
            it->second.failure = why;
          }
        }
        break;
      }
      case wire::Envelope::kClosed: {
        const wire::Closed& cl = env.closed();
        if (cl.incarnation() != incarnation_) break;  // an answer to an earlier life of this gateway
        const Key key{cl.round(), cl.tag()};
        auto it = rounds_.find(key);
        if (it != rounds_.end() && it->second.local) {
          Outgoing& o = it->second.out[p.index];
          if (o.closed) break;
          // Not waited for any more, and its payload (if here) is not used:
          // it did not use ours.
          o.closed = true;
          o.abandoned = true;
        }
        noteParted(p, key, "site '" + p.name + "' had closed the round without this site's payload");
        break;
      }
      default:
        log("unexpected message from " + p.name + " on its reply channel: ignored");
    }
    return true;
  }

  // Everything unacked to this peer goes again from the first chunk.
  void restartSends(size_t peer) {
    for (auto& kv : rounds_) {
      Round& r = kv.second;
      if (!r.local) continue;
      Outgoing& o = r.out[peer];
      if (o.acked || o.abandoned) continue;
      o.next = 0;
      o.resend.clear();
      o.queued.clear();
    }
  }

  // ------------------------------------------------------ router side ---

  void dropRest(zmq::socket_t& s, zmq::message_t& last) {
    while (last.more()) {
      if (!s.recv(last, zmq::recv_flags::dontwait)) break;
    }
  }

  Peer* peerByName(const std::string& name) {
    for (Peer& p : peers_) {
      if (p.name == name) return &p;
    }
    return nullptr;
  }

  bool receiveRouter() {
    zmq::message_t id, frame;
    if (!router_->recv(id, zmq::recv_flags::dontwait)) return false;
    if (!id.more()) return true;
    if (!router_->recv(frame, zmq::recv_flags::dontwait)) return true;
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
    Peer& p = peers_[conn->second];
    if (!opt_.insecure) {
      // The binding was made under this connection's key; check it anyway.
      const char* user = zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "User-Id");
      if (user == nullptr || p.name != user) {
        log("dropped a message on the connection of '" + p.name + "' from the key of '" + (user ? user : "?") + "'");
        return true;
      }
    }
    p.last_heard = Clock::now();
    if (env.body_case() == wire::Envelope::kChunk) {
      if (!m.has_data) {
        reply(routing, refuseEnv(env.chunk().round(), env.chunk().tag(), "chunk without a data frame"));
        return true;
      }
      handleChunk(p, routing, env.chunk(), data);
    }
    return true;
  }

  void handleHello(const std::string& routing, const zmq::message_t& frame, const wire::Hello& h) {
    const char* user = opt_.insecure ? nullptr : zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "User-Id");
    const std::string reason = checkHello(h, user, hello_terms_);
    wire::Envelope env;
    wire::Welcome* w = env.mutable_welcome();
    w->set_site(opt_.site);
    w->set_incarnation(incarnation_);
    if (!reason.empty()) {
      w->set_accepted(false);
      w->set_reason(reason);
      log("refused handshake from '" + h.site() + "': " + reason);
      reply(routing, env);
      return;
    }
    w->set_accepted(true);
    Peer* p = peerByName(h.site());  // checkHello: one of peers_
    // This connection speaks for the site from now on; an older one of the
    // same site (half-open after a restart or a partition) no longer does.
    const size_t slot = size_t(p - peers_.data());
    for (auto it = conns_.begin(); it != conns_.end();) {
      it = it->second == slot ? conns_.erase(it) : std::next(it);
    }
    conns_[routing] = slot;
    const bool restarted = p->greeted && p->incarnation != h.incarnation();
    p->greeted = true;
    p->last_heard = Clock::now();
    if (p->incarnation != h.incarnation()) {
      p->incarnation = h.incarnation();
      if (restarted) {
        // Its new life lost whatever its old one acknowledged. (Not on the
        // first Hello: what is already on its way to it is still good.)
        log("site '" + p->name + "' restarted: resending this site's open payloads");
        for (auto& kv : rounds_) {
          if (!kv.second.local) continue;
          Outgoing& o = kv.second.out[p->index];
          if (o.abandoned) continue;
          o = Outgoing{};
        }
      }
      // Payloads from its previous life are void in rounds not completed
      // here: partial ones are useless, and a whole one may no longer be
      // what its new life sends for that round (a rejoining site takes part
      // without a contribution). Both sides must use the same payloads.
      for (auto& kv : rounds_) {
        if (kv.second.completed) continue;
        Incoming& in = kv.second.in[p->index];
        if (in.count > 0 && in.incarnation != h.incarnation()) in = Incoming{};
      }
      // What it lost is resent when our DEALER reconnects and is welcomed
      // again (handleMonitor, receiveDealer).
    }
    reply(routing, env);
  }

  wire::Envelope ackEnv(uint64_t round, const std::string& tag) {
    wire::Envelope env;
    env.mutable_ack()->set_round(round);
    env.mutable_ack()->set_tag(tag);
    return env;
  }

  wire::Envelope closedEnv(uint64_t round, const std::string& tag, uint64_t incarnation) {
    wire::Envelope env;
    wire::Closed* c = env.mutable_closed();
    c->set_round(round);
    c->set_tag(tag);
    c->set_incarnation(incarnation);
    return env;
  }

  // This site and `p` applied different results for (round, tag): one
  // closed it without the other (takeDivergedPeers).
  void noteParted(const Peer& p, const Key& key, const std::string& how) {
    log("round " + std::to_string(key.first) + " '" + key.second + "': " + how +
        ": the two sites now hold different state");
    std::lock_guard<std::mutex> lock(mu_);
    if (std::find(diverged_.begin(), diverged_.end(), p.name) == diverged_.end() && diverged_.size() < 64) {
      diverged_.push_back(p.name);
    }
  }

  // A chunk of `p` for a round this site completed without it: Closed, the
  // parting noted once per tag and life (its later chunks get Closed too).
  bool answeredLeftOut(Peer& p, const std::string& routing, const wire::Chunk& c) {
    auto it = left_out_.find({c.tag(), p.index});
    if (it == left_out_.end() || !it->second.has(c.round(), c.incarnation())) return false;
    reply(routing, closedEnv(c.round(), c.tag(), c.incarnation()));
    if (!it->second.told) {
      it->second.told = true;
      noteParted(p, {c.round(), c.tag()},
                 "site '" + p.name + "' sent its payload after this site had closed the round without it");
    }
    return true;
  }

  wire::Envelope refuseEnv(uint64_t round, const std::string& tag, const std::string& why) {
    wire::Envelope env;
    wire::Refuse* r = env.mutable_refuse();
    r->set_round(round);
    r->set_tag(tag);
    r->set_reason(why);
    return env;
  }

  // `routing`: the connection it came on, where replies go.
  void handleChunk(Peer& p, const std::string& routing, const wire::Chunk& c, const zmq::message_t& data) {
    // Only the incarnation that said Hello may send: a stale or forged one
    // could otherwise make us drop and reallocate buffers at will.
    if (c.incarnation() != p.incarnation) return;
    const Key key{c.round(), c.tag()};
    if (answeredLeftOut(p, routing, c)) return;
    if (finished_.count(key)) {  // stale or duplicate: it may have missed our Ack
      reply(routing, ackEnv(c.round(), c.tag()));
      return;
    }
    auto it = rounds_.find(key);
    if (it != rounds_.end() && it->second.in[p.index].complete) {
      // Whatever it holds, a chunk of a payload that is already in changes
      // nothing (PROTOCOL.md): our Ack may have been lost, acknowledge again.
      reply(routing, ackEnv(c.round(), c.tag()));
      return;
    }
    // Layout checks before anything is allocated.
    const uint64_t total = c.total_bytes();
    std::string bad = checkChunk(c, data.size(), ChunkLimits{opt_.chunk_bytes, opt_.max_message_bytes});
    bool flood = false;
    if (bad.empty() && (it == rounds_.end() || !it->second.local) &&
        (it == rounds_.end() || it->second.in[p.index].count == 0)) {
      // Each peer may open only a few keys this site has not reached yet, so
      // one flooding peer can neither exhaust memory nor crowd out the others.
      size_t ahead = 0;
      for (const auto& kv : rounds_) ahead += !kv.second.local && kv.second.in[p.index].count > 0;
      if (ahead >= size_t(2 * opt_.max_rounds_in_flight)) {
        bad = "too many rounds opened ahead of this site (" + std::to_string(ahead) + " from this peer)";
        flood = true;
      }
    }
    if (!bad.empty()) {
      log("refused round " + std::to_string(c.round()) + " '" + c.tag() + "' from '" + p.name + "': " + bad);
      reply(routing, refuseEnv(c.round(), c.tag(), bad));
      // With `continue` the site simply counts as missing for this round
      // (and is not waited for: it will not send the payload again).
      // With `wait` nothing good can come any more: fail the round now, with
      // the reason, instead of at the hard deadline.
      if (opt_.on_site_loss == OnSiteLoss::kContinue) {
        if (it != rounds_.end() && it->second.local) {
          it->second.in_refused[p.index] = true;
        } else if (refused_in_[key].insert(p.index).second && refused_in_.size() > kMaxRefusedKeys) {
          refused_in_.erase(refused_in_.begin());  // the oldest round numbers first
        }
      } else if (!flood) {
        const std::string why = "site '" + p.name + "' sent a bad payload: " + bad;
        if (it != rounds_.end() && it->second.local) {
          if (it->second.failure.empty()) it->second.failure = why;
        } else if (!refused_.count(key)) {  // for when this site opens the round
          refused_.emplace(key, why);
          refused_order_.push_back(key);
          while (refused_order_.size() > kMaxRefusedKeys) {
            refused_.erase(refused_order_.front());
            refused_order_.pop_front();
          }
        }
      }
      return;
    }
    Round& r = it != rounds_.end() ? it->second : newRound(key, false);
    Incoming& in = r.in[p.index];  // not complete: see above
    if (in.count == 0 || in.incarnation != c.incarnation()) {
      in = Incoming{};
      in.incarnation = c.incarnation();
      in.total = total;
      in.count = c.count();
      in.kind = c.kind();
      in.data = recycledBuffer(total);  // empty unless one is held already: see below
    }
    if (in.total != total || in.count != c.count()) {
      reply(routing, refuseEnv(c.round(), c.tag(), "chunk layout changed within one payload"));
      return;
    }
    if (c.index() < in.have.size() && in.have[c.index()]) return;
    if (chunkChecksum(data.data(), data.size()) != c.xxh3()) {
      log("chunk " + std::to_string(c.index()) + " of round " + std::to_string(c.round()) + " '" + c.tag() +
          "' from '" + p.name + "' failed its checksum: asking for it again");
      wire::Envelope nack;
      nack.mutable_nack()->set_round(c.round());
      nack.mutable_nack()->set_tag(c.tag());
      nack.mutable_nack()->set_index(c.index());
      reply(routing, nack);
      return;
    }
    // Memory follows the bytes that arrived, not the size the first chunk
    // claims: a peer that announces 1 GiB and sends one chunk costs one
    // chunk (twice at most, the buffer growing geometrically up to `total`).
    const uint64_t end = uint64_t(c.index()) * opt_.chunk_bytes + data.size();
    try {
      if (in.data.size() < end) {
        if (in.data.capacity() < end) in.data.reserve(std::min<uint64_t>(total, std::max<uint64_t>(end, 2 * in.data.capacity())));
        in.data.resize(end);
      }
      if (in.have.size() <= c.index()) in.have.resize(c.index() + 1, false);
    } catch (const std::bad_alloc&) {
      in = Incoming{};
      log("cannot allocate " + std::to_string(end) + " bytes for round " + std::to_string(c.round()) + " '" +
          c.tag() + "' from '" + p.name + "'");
      reply(routing, refuseEnv(c.round(), c.tag(), "the receiver cannot allocate the payload"));
      return;
    }
    if (data.size() > 0) std::memcpy(in.data.data() + uint64_t(c.index()) * opt_.chunk_bytes, data.data(), data.size());
    in.have[c.index()] = true;
    r.metrics[p.index].bytes_received += data.size();
    if (++in.have_count == in.count) {
      in.complete = true;
      in.done_at = Clock::now();
      reply(routing, ackEnv(c.round(), c.tag()));
    }
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

  Round& newRound(const Key& key, bool local) {
    Round& r = rounds_[key];
    r.key = key;
    r.local = local;
    r.out.resize(opt_.sites.size());
    r.in.resize(opt_.sites.size());
    r.in_refused.assign(opt_.sites.size(), false);
    r.metrics.resize(opt_.sites.size());
    for (size_t i = 0; i < opt_.sites.size(); ++i) r.metrics[i].site = opt_.sites[i].name;
    r.start = Clock::now();
    r.next_wait_log = r.start + opt_.round_deadline;
    return r;
  }

  void takeCommands() {
    std::deque<Command> cmds;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cmds.swap(commands_);
    }
    for (Command& c : cmds) {
      const Key key{c.round, c.tag};
      if (finished_.count(key)) {
        c.promise.set_exception(std::make_exception_ptr(InvalidArgument(
            "exchange: round " + std::to_string(c.round) + " tag '" + c.tag + "' was already exchanged")));
        std::lock_guard<std::mutex> lock(mu_);
        --open_rounds_;
        open_keys_.erase(key);
        slots_.notify_all();
        continue;
      }
      auto it = rounds_.find(key);
      Round& r = it != rounds_.end() ? it->second : newRound(key, true);
      r.local = true;
      r.start = Clock::now();
      r.next_wait_log = r.start + opt_.round_deadline;
      r.payload = std::move(c.payload);
      r.kind = c.kind;
      auto refused = refused_.find(key);
      if (refused != refused_.end()) r.failure = refused->second;
      auto refused_in = refused_in_.find(key);
      if (refused_in != refused_in_.end()) {
        for (size_t i : refused_in->second) r.in_refused[i] = true;
        refused_in_.erase(refused_in);
      }
      r.chunk_count = r.payload->empty() ? 1 : uint32_t((r.payload->size() + opt_.chunk_bytes - 1) / opt_.chunk_bytes);
      r.promise = std::move(c.promise);
    }
  }

  bool hasWork(size_t peer) const {
    for (const auto& kv : rounds_) {
      const Round& r = kv.second;
      if (!r.local) continue;
      const Outgoing& o = r.out[peer];
      if (!o.acked && !o.abandoned && (o.next < r.chunk_count || !o.resend.empty())) return true;
    }
    return false;
  }

  // Sends as many chunks as the sockets take, round-robin over rounds.
  void sendChunks() {
    for (Peer& p : peers_) {
      if (!p.welcomed) continue;
      bool progress = true;
      bool full = false;
      while (progress && !full) {
        progress = false;
        for (auto& kv : rounds_) {
          Round& r = kv.second;
          if (!r.local) continue;
          Outgoing& o = r.out[p.index];
          if (o.acked || o.abandoned) continue;
          uint32_t index;
          bool retry = false;
          if (!o.resend.empty()) {
            index = o.resend.front();
            retry = true;
          } else if (o.next < r.chunk_count) {
            index = o.next;
          } else {
            continue;
          }
          if (!sendChunk(p, r, index, retry)) {  // this peer's socket is full: the next peer
            full = true;
            break;
          }
          if (retry) {
            o.resend.pop_front();
            o.queued[index] = false;
          } else {
            ++o.next;
          }
          progress = true;
        }
      }
    }
  }

  bool sendChunk(Peer& p, Round& r, uint32_t index, bool retry) {
    const uint64_t off = uint64_t(index) * opt_.chunk_bytes;
    const size_t len = size_t(std::min<uint64_t>(opt_.chunk_bytes, r.payload->size() - std::min<uint64_t>(off, r.payload->size())));
    const uint8_t* bytes = r.payload->data() + off;
    wire::Envelope env;
    wire::Chunk* c = env.mutable_chunk();
    c->set_round(r.key.first);
    c->set_tag(r.key.second);
    c->set_incarnation(incarnation_);
    c->set_index(index);
    c->set_count(r.chunk_count);
    c->set_total_bytes(r.payload->size());
    c->set_xxh3(chunkChecksum(bytes, len));
    c->set_kind(uint32_t(r.kind));
    zmq::message_t data;
    if (!retry && opt_.test_corrupt_chunk == int64_t(index) && len > 0) {
      data.rebuild(bytes, len);
      static_cast<uint8_t*>(data.data())[len / 2] ^= 0x5a;
    } else if (len > 0) {
      // Zero copy: the frame borrows the payload and holds a reference to it.
      auto* hold = new std::shared_ptr<std::vector<uint8_t>>(r.payload);
      data.rebuild(const_cast<uint8_t*>(bytes), len,
                   [](void*, void* hint) { delete static_cast<std::shared_ptr<std::vector<uint8_t>>*>(hint); },
                   hold);
    }
    if (!sendEnvelope(*p.dealer, env, &data)) return false;
    r.metrics[p.index].bytes_sent += len;
    return true;
  }

  void timers() {
    const auto now = Clock::now();
    std::vector<std::string> live;
    for (Peer& p : peers_) {
      if (now - p.last_heartbeat >= opt_.heartbeat) {
        p.last_heartbeat = now;
        if (p.welcomed) {
          wire::Envelope env;
          env.mutable_heartbeat()->set_incarnation(incarnation_);
          sendEnvelope(*p.dealer, env, nullptr);
        } else if (!fatal_ && now - p.hello_sent >= opt_.heartbeat * 2) {
          sendHello(p);  // no Welcome yet (peer not up, or the Hello was lost)
        }
      }
      if (p.greeted && now - p.last_heard < opt_.peer_timeout) live.push_back(p.name);
      // A site that went silent and is heard again in the same life: the
      // link was cut (a partition), not the process (a restart says Hello
      // with a new incarnation).
      if (!p.lost && peerLost(p)) {
        p.lost = true;
        p.lost_incarnation = p.incarnation;
      } else if (p.lost && !peerLost(p)) {
        p.lost = false;
        if (p.incarnation == p.lost_incarnation) {
          log("site '" + p.name + "' is back after a silence (same incarnation: the link, not the site, was lost)");
          std::lock_guard<std::mutex> lock(mu_);
          if (returned_.size() < 64) returned_.push_back(p.name);  // bounded if nobody asks
        }
      }
    }
    // Rounds peers have opened and this site has not (a restarted site's
    // join request, a peer running ahead), for peerRounds(): every 20 ms.
    const bool refresh = now >= next_opened_;
    std::vector<PeerRound> opened;
    if (refresh) {
      next_opened_ = now + std::chrono::milliseconds(20);
      for (const auto& kv : rounds_) {
        if (kv.second.local) continue;
        for (const Peer& p : peers_) {
          if (kv.second.in[p.index].count > 0) opened.push_back({kv.first.first, kv.first.second, p.name});
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_.swap(live);
    if (refresh) opened_.swap(opened);
  }

  // A peer heard from once and silent for peer_timeout since: gone, not late.
  bool peerLost(const Peer& p) const { return p.greeted && Clock::now() - p.last_heard >= opt_.peer_timeout; }

  bool peerSilent(const Peer& p) const {
    return !p.greeted || Clock::now() - p.last_heard >= opt_.peer_timeout;
  }

  void finishRounds() {
    const auto now = Clock::now();
    std::vector<Key> done, stale;
    for (auto& kv : rounds_) {
      Round& r = kv.second;
      if (!r.local) {
        // A peer ran ahead into a round this site never opened: give its
        // buffers back once the hard deadline has passed.
        if (now >= r.start + opt_.hard_deadline) stale.push_back(kv.first);
        continue;
      }
      if (!r.completed) {
        if (!r.failure.empty()) {
          completeWithError(r, std::make_exception_ptr(ProtocolError(
                                   "round " + std::to_string(r.key.first) + " '" + r.key.second + "': " + r.failure)));
        } else {
          // Done when every peer's payload is here and every peer has
          // acknowledged ours (so the metrics are whole and nobody depends
          // on a payload we might drop).
          // A peer whose payload is here but whose acknowledgement is not is
          // waited for only while it is alive: a site that finished and
          // left (or died) after sending cannot acknowledge any more.
          std::vector<std::string> missing, waiting;
          for (const Peer& p : peers_) {
            const bool refused = r.refusedEitherWay(p.index);
            const bool closed = r.out[p.index].closed;  // it went on without us
            const bool in = r.in[p.index].complete && !refused && !closed;
            if (!in) missing.push_back(p.name);
            // With `continue`, a site that was up and went silent is not
            // waited for: the round goes on without it at once instead of
            // at the round deadline (a site never heard from still gets the
            // round deadline to come up).
            const bool gone = opt_.on_site_loss == OnSiteLoss::kContinue && (peerLost(p) || refused || closed);
            if ((!in && !gone) || (!r.out[p.index].acked && !refused && !closed && !peerSilent(p))) {
              waiting.push_back(p.name);
            }
          }
          const double age = secondsSince(r.start);
          if (waiting.empty()) {
            if (!missing.empty()) {
              log("round " + std::to_string(r.key.first) + " '" + r.key.second + "': continuing without " +
                  join(missing) + " (silent for " + fmt(opt_.peer_timeout.count() / 1000.0) + " s or more)");
            }
            complete(r, missing);
          } else if (now >= r.start + opt_.round_deadline && opt_.on_site_loss == OnSiteLoss::kContinue) {
            if (!missing.empty()) {
              log("round " + std::to_string(r.key.first) + " '" + r.key.second + "': continuing without " +
                  join(missing) + " after " + fmt(age) + " s");
            }
            complete(r, missing);
          } else if (now >= r.start + opt_.hard_deadline) {
            completeWithError(r, std::make_exception_ptr(TimeoutError(
                                     "round " + std::to_string(r.key.first) + " '" + r.key.second +
                                     "': no payload from " + join(waiting) + " within the hard deadline of " +
                                     fmt(opt_.hard_deadline.count() / 1000.0) + " s (" + silence(waiting) + ")")));
          } else if (now >= r.next_wait_log ||
                     (!r.said_waiting && std::any_of(peers_.begin(), peers_.end(), [&](const Peer& p) {
                       return peerLost(p) && std::find(waiting.begin(), waiting.end(), p.name) != waiting.end();
                     }))) {
            // Said at once when a site we wait for is gone, then every round deadline.
            r.said_waiting = true;
            log("round " + std::to_string(r.key.first) + " '" + r.key.second + "': waiting for " + join(waiting) +
                " (" + silence(waiting) + "); giving up at the hard deadline in " +
                fmt(opt_.hard_deadline.count() / 1000.0 - age) + " s");
            r.next_wait_log = now + opt_.round_deadline;
          }
        }
      }
      if (r.completed) {
        // Keep sending to peers that have not acknowledged, unless they are
        // gone (silent) or the hard deadline passed.
        bool pending = false;
        for (const Peer& p : peers_) {
          Outgoing& o = r.out[p.index];
          if (o.acked || o.abandoned) continue;
          if (peerSilent(p) || now >= r.start + opt_.hard_deadline || !r.failure.empty()) {
            o.abandoned = true;
          } else {
            pending = true;
          }
        }
        if (!pending) done.push_back(kv.first);
      }
    }
    for (const Key& k : stale) rounds_.erase(k);
    for (const Key& k : done) {
      rounds_.erase(k);
      finished_.insert(k);
      finished_order_.push_back(k);
      while (finished_order_.size() > size_t(16 * opt_.max_rounds_in_flight)) {
        finished_.erase(finished_order_.front());
        finished_order_.pop_front();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        --open_rounds_;
        open_keys_.erase(k);
      }
      slots_.notify_all();
    }
  }

  void complete(Round& r, const std::vector<std::string>& missing) {
    if (audit_) {
      // Every payload received is on record before the caller sees it.
      try {
        for (const Peer& p : peers_) {
          const Incoming& in = r.in[p.index];
          if (!in.complete) continue;
          const MessageKind kind = MessageKind(in.kind);  // checkChunk: 1-4
          auditPayload("in", r.key.first, r.key.second, in.data.data(), in.data.size(), kind, &p);
        }
      } catch (const std::exception& e) {
        completeWithError(r, std::make_exception_ptr(Error(std::string("gateway '") + opt_.site + "': round " +
                                                          std::to_string(r.key.first) + " '" + r.key.second +
                                                          "' not delivered: " + e.what())));
        return;
      }
    }
    // Who this round went on without (not who refused: both sides leave a
    // refused payload out). A late chunk of theirs gets Closed, not Ack.
    // Model updates only: a join's or a digest's round left out is no
    // parting (the updates' rounds say it).
    for (const Peer& p : peers_) {
      if (std::find(missing.begin(), missing.end(), p.name) == missing.end() || r.refusedEitherWay(p.index)) continue;
      // Whatever it sent for this round is not in the result: a chunk still
      // to come must not complete it and be acknowledged.
      r.in[p.index].complete = false;
      if (r.kind != MessageKind::kModelUpdate) continue;
      LeftOut& lo = left_out_[{r.key.second, p.index}];
      const uint64_t life = p.greeted ? p.incarnation : 0;
      if (lo.incarnation != life) lo = LeftOut{life, {}, false};
      lo.add(r.key.first);
      if (lo.spans.size() > kMaxLeftOutSpans) lo.spans.erase(lo.spans.begin());
    }
    RoundResult res;
    res.round = r.key.first;
    res.tag = r.key.second;
    res.seconds = secondsSince(r.start);
    res.missing = missing;
    res.payloads.resize(opt_.sites.size());
    // Once every peer has acknowledged, nothing will be sent again and no
    // frame borrows the payload any more: hand it back without a copy.
    bool delivered = true;
    for (const Peer& p : peers_) delivered = delivered && r.out[p.index].acked;
    if (delivered && r.payload.use_count() == 1) {
      res.payloads[self_] = std::move(*r.payload);
      r.payload = std::make_shared<std::vector<uint8_t>>();
    } else {
      res.payloads[self_] = *r.payload;
    }
    for (const Peer& p : peers_) {
      Incoming& in = r.in[p.index];
      PeerMetrics m = r.metrics[p.index];
      if (in.complete && !r.refusedEitherWay(p.index)) {
        const double secs = std::max(1e-9, std::chrono::duration<double>(in.done_at - r.start).count());
        m.goodput_mbps = 8.0 * double(in.total) / secs / 1e6;
        res.payloads[p.index] = std::move(in.data);
      } else {
        m.missing = true;
      }
      res.peers.push_back(m);
    }
    writeMetrics(res);
    r.promise.set_value(std::move(res));
    r.completed = true;
  }

  void completeWithError(Round& r, std::exception_ptr e) {
    r.promise.set_exception(e);
    r.completed = true;
    if (r.failure.empty()) r.failure = "failed";
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
    for (auto& kv : rounds_) {
      if (kv.second.local && !kv.second.completed) completeWithError(kv.second, e);
    }
    std::deque<Command> cmds;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cmds.swap(commands_);
    }
    for (Command& c : cmds) c.promise.set_exception(e);
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_rounds_ -= static_cast<int>(cmds.size());
      for (const Command& c : cmds) open_keys_.erase({c.round, c.tag});
    }
    slots_.notify_all();
  }

  void rethrowFatal() {
    if (fatal_) std::rethrow_exception(fatal_);
  }

  void setFatal(std::exception_ptr e, const std::string& what) {
    log("fatal: " + what);
    std::lock_guard<std::mutex> lock(mu_);
    fatal_ = e;
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
    for (auto& kv : rounds_) {
      if (kv.second.local && !kv.second.completed) kv.second.promise.set_exception(e);
    }
    rounds_.clear();
  }

  // -------------------------------------------------------------- logs ---

  void log(const std::string& line) const {
    std::fprintf(stderr, "strait gateway %s: %s\n", opt_.site.c_str(), line.c_str());
  }
  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  }
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f", v);
    return b;
  }
  std::string silence(const std::vector<std::string>& names) {
    std::string s;
    for (const std::string& n : names) {
      const Peer* p = peerByName(n);
      s += (s.empty() ? "" : "; ") + n + ": " +
           (p && p->greeted ? "last heard " + fmt(secondsSince(p->last_heard)) + " s ago" : "never connected");
    }
    return s;
  }

  GatewayOptions opt_;
  HelloTerms hello_terms_;  // what peers' Hellos are checked against
  // The ROUTER's connections that speak for a site (routing id -> position
  // in peers_): the one whose Hello was welcomed last, at most one per site.
  std::map<std::string, size_t> conns_;
  size_t self_ = 0;
  uint64_t incarnation_ = 0;
  int wake_fd_ = -1;
  std::thread io_;
  std::atomic<bool> stop_{false};

  // Policy state.
  std::unique_ptr<AuditLog> audit_;  // thread-safe itself
  mutable std::mutex priv_mu_;
  uint64_t releases_ = 0;    // privatize() calls
  uint64_t privatized_ = 0;  // privatized updates not yet sent
  double spent_ = 0;         // epsilon after releases_

  // Shared with API threads, under mu_.
  mutable std::mutex mu_;
  std::condition_variable slots_;
  int open_rounds_ = 0;
  std::deque<Command> commands_;
  std::set<Key> open_keys_;  // (round, tag) of open exchanges: at most max_rounds_in_flight
  std::exception_ptr fatal_;
  std::vector<std::string> live_;
  std::vector<PeerRound> opened_;
  std::vector<std::string> returned_;  // for takeReturnedPeers(), at most a few per peer
  std::vector<std::string> diverged_;  // for takeDivergedPeers(), each site once
  std::vector<std::vector<uint8_t>> pool_;  // recycled receive buffers, at most poolLimit()

  // I/O thread only.
  zmq::context_t ctx_{2};  // two I/O threads: sending and receiving proceed in parallel
  std::unique_ptr<zmq::socket_t> router_;
  std::unique_ptr<zmq::socket_t> zap_;
  std::vector<Peer> peers_;
  std::map<Key, Round> rounds_;
  std::map<Key, std::string> refused_;  // bad payloads for keys not opened yet, at most kMaxRefusedKeys
  std::map<Key, std::set<size_t>> refused_in_;  // continue: peers refused in keys not opened yet (bounded too)
  std::deque<Key> refused_order_;
  std::set<Key> finished_;  // the last 16 x max_rounds_in_flight done
  std::map<std::pair<std::string, size_t>, LeftOut> left_out_;  // (tag, peer index): rounds completed without it
  std::deque<Key> finished_order_;
  Clock::time_point next_opened_{};
};

Gateway::Gateway(GatewayOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Gateway::~Gateway() = default;

std::future<RoundResult> Gateway::exchange(uint64_t round, const std::string& tag, std::vector<uint8_t> payload,
                                           core::MessageKind kind) {
  return impl_->exchange(round, tag, std::move(payload), kind);
}
double Gateway::privatize(float* x, size_t n) { return impl_->privatize(x, n); }
double Gateway::privacySpent() const { return impl_->privacySpent(); }
uint64_t Gateway::privacyReleases() const { return impl_->privacyReleases(); }
std::string Gateway::auditHead() const { return impl_->auditHead(); }
uint64_t Gateway::auditRecords() const { return impl_->auditRecords(); }
size_t Gateway::siteIndex() const { return impl_->self(); }
const GatewayOptions& Gateway::options() const { return impl_->options(); }
std::vector<std::string> Gateway::livePeers() const { return impl_->livePeers(); }
std::vector<PeerRound> Gateway::peerRounds(const std::string& prefix) const { return impl_->peerRounds(prefix); }
std::vector<std::string> Gateway::takeReturnedPeers() { return impl_->takeReturnedPeers(); }
std::vector<std::string> Gateway::takeDivergedPeers() { return impl_->takeDivergedPeers(); }
void Gateway::recycle(std::vector<uint8_t> buffer) { impl_->recycle(std::move(buffer)); }

}  // namespace strait::transport
