#pragma once
// The gateway's round table (transport-internal): every (round, tag) this
// site or a peer has opened, and the rules that complete them
// (docs/PROTOCOL.md, "Payloads, chunks and rounds", "Site loss", "Parting").
// A pure state machine: events in (this site opens a round; a peer's chunk,
// Ack, Nack, Refuse or Closed; a peer's new connection or new life; the
// clock), effects out (envelopes to answer with, rounds delivered or failed,
// rounds done, log lines, sites this one parted from). No sockets and no
// clock of its own, so tests replay any sequence of events, a freeze or a
// restart under load included, without a network.
// Not thread-safe: the gateway's I/O thread owns it. Throws nothing but
// std::bad_alloc (an allocation that fails for a peer's payload is refused).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/config/config.h"
#include "transport/gateway.h"
#include "transport/impl/peer_table.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {

using Key = std::pair<uint64_t, std::string>;  // (round, tag)

struct RoundRules {
  std::vector<std::string> sites;  // every site's name, job order
  size_t self = 0;
  size_t chunk_bytes = 1 << 20;
  size_t max_message_bytes = size_t{1} << 30;
  int max_rounds_in_flight = 4;
  OnSiteLoss on_site_loss = OnSiteLoss::kWait;
  std::chrono::milliseconds peer_timeout{5000};
  std::chrono::milliseconds round_deadline{60000};
  std::chrono::milliseconds hard_deadline{600000};

  static RoundRules of(const GatewayOptions& o, size_t self);
};

// A round of this site, delivered: the result, and the kind each received
// payload was declared as (for the audit record written before delivery).
struct Delivery {
  RoundResult result;
  std::vector<core::MessageKind> kinds;  // per site, meaningful where the payload is in
};

// What the gateway does after an event, in this order: replies go on the
// connection the event came on; logs are printed; `parted` sites are told
// to the application (Gateway::takeDivergedPeers); delivered and failed
// rounds settle their futures; `done` rounds free their slots.
struct Effects {
  std::vector<wire::Envelope> replies;
  std::vector<std::string> logs;
  std::vector<size_t> parted;
  std::vector<Delivery> delivered;
  std::vector<std::pair<Key, std::exception_ptr>> failed;
  std::vector<Key> done;
};

// Our payload's state towards one peer.
enum class SendState {
  kSending,   // chunks going or gone, no Ack yet
  kAcked,     // the peer has it
  kParked,    // the round finished while the peer was silent: resent if it comes back in the same life
  kGaveUp,    // past the hard deadline, the round failed, or the peer restarted
  kRefused,   // the peer refused it (continue: the round goes on without it)
  kClosed,    // the peer ended the round without it (Closed): the sites parted
};

// A peer's payload's state here.
enum class ReceiveState { kEmpty, kPartial, kComplete };

// A round's stage.
enum class Stage {
  kAhead,      // opened by a peer, not (yet) by this site
  kOpen,       // this site's exchange() waits for it
  kDelivered,  // result handed over; still sending to peers that have not acked
  kFailed,     // error handed over; nothing more is sent
};

// One chunk the table wants sent (RoundTable::send).
struct ChunkToSend {
  const Key& key;
  core::MessageKind kind;
  const std::shared_ptr<std::vector<uint8_t>>& payload;  // the whole payload; the chunk borrows from it
  uint32_t index = 0;
  uint32_t count = 0;
  uint64_t offset = 0;
  size_t bytes = 0;
  bool retry = false;  // asked for again (Nack)
};

// The stream a chunk tries first: chunk i of every payload goes on stream
// i mod `streams` (then the next ones, in turn, if that one is down or
// full). So a payload's chunks are striped over the streams, and every
// payload starts on stream 0: a payload of one chunk (a DiLoCo sync of a
// small model, an every-step bucket, a control round) goes on the
// connection that carries most, whose TCP congestion window is open. Taking
// the streams in turn across payloads instead put each small payload on a
// connection idle for the last `streams` rounds, and TCP restarts an idle
// connection's window (slow start after idle): across 150 ms a 77 KB
// round took 0.375 s against 0.150 s on one warm connection under BBR
// (docs/BENCHMARKS.md, "Small payloads on a warm connection").
inline size_t firstStream(const ChunkToSend& c, size_t streams) { return streams ? c.index % streams : 0; }

// Rounds complete on receipt (every peer's payload is here) only while
// this site's own payload is at most this large; a larger one completes
// when its acknowledgements are in too (RoundTable::tickOpen).
constexpr uint64_t kCompleteOnReceiptMaxBytes = uint64_t(64) << 20;

class RoundTable {
 public:
  // A receive buffer of `bytes` (recycled memory) or an empty one.
  using Buffers = std::function<std::vector<uint8_t>(uint64_t bytes)>;
  // Puts one chunk on one of the peer's streams (connections): the stream
  // it went on, or kFull if none takes it now (try later).
  using Send = std::function<int(const ChunkToSend&)>;
  static constexpr int kFull = -1;

  explicit RoundTable(RoundRules rules, Buffers buffers = {});

  // exchange(): this site opens `key` with its payload. "" or why not (the
  // key was exchanged already).
  std::string open(const Key& key, core::MessageKind kind, std::shared_ptr<std::vector<uint8_t>> payload,
                   Clock::time_point now);

  // A chunk from site `peer` whose current life is `life` (PeerTable),
  // with its `size` bytes of data.
  void chunk(size_t peer, uint64_t life, const wire::Chunk& c, const uint8_t* data, size_t size,
             Clock::time_point now, Effects& fx);
  // Answers from `peer` to our payload of `key`.
  void ack(size_t peer, const Key& key);
  void nack(size_t peer, const Key& key, uint32_t index);
  // A Refuse of our payload; `life` is the refuser's current life. For a
  // round this site already delivered with the refuser's payload in (it
  // completed on receipt before the refusal came), the two sites now hold
  // different results: a parting, and a Closed to tell the refuser.
  void refused(size_t peer, uint64_t life, const Key& key, const std::string& reason, Effects& fx);
  void closed(size_t peer, const Key& key, Effects& fx);

  // Our Hello was welcomed on a new connection of `stream` to `peer`:
  // whatever was in flight on the stream's old connection may be lost, so
  // its chunks of unacked payloads go again (streamLost), and payloads
  // parked while the peer was silent start again.
  void welcomed(size_t peer, int stream);
  // The connection of `stream` to `peer` broke: the chunks of unacked
  // payloads that went on it may be lost; they go again, on whichever
  // streams take them (a lost stream is survived by the others).
  void streamLost(size_t peer, int stream);
  // `peer` said Hello in a new life (HelloLife::kFirst or kRestarted).
  void newLife(size_t peer, uint64_t life, bool restarted, Effects& fx);

  bool hasWork(size_t peer) const;
  // Offers `peer`'s socket one chunk per round that has one, round-robin,
  // until every round is out of chunks or `send` says the socket is full.
  void send(size_t peer, const Send& send);

  // Completes, fails and retires rounds by the rules and the clock.
  void tick(Clock::time_point now, const PeerTable& peers, Effects& fx);
  // Every round of this site still open fails with `e` (a refused
  // handshake); with `forget`, the whole table is cleared (shutdown).
  void failAll(std::exception_ptr e, bool forget, Effects& fx);

  // The peers that have not yet acknowledged a payload of a round this site
  // has delivered (rounds complete on receipt, so ours may still be on its
  // way), parked ones included: a closing gateway lingers for them. Not ones
  // that stopped, nor ones silent for longer than silence_grace; each
  // payload is given up at its round's hard deadline.
  std::vector<size_t> awaitingAcks(Clock::time_point now, const PeerTable& peers,
                                   Clock::duration silence_grace = Clock::duration::zero()) const;
  // Rounds peers opened that this site has not (a join request, a peer
  // running ahead), one entry per peer.
  std::vector<PeerRound> openedByPeers() const;
  size_t size() const { return rounds_.size(); }
  // Finished rounds kept for a peer that went silent before acknowledging
  // (at most max_rounds_in_flight; until the hard deadline).
  size_t parked() const { return parked_.size(); }

 private:
  struct Outgoing {
    SendState state = SendState::kSending;
    uint32_t next = 0;            // next chunk of the first pass
    std::deque<uint32_t> resend;  // chunks asked for again (Nack, a lost stream), each at most once
    std::vector<bool> queued;     // which chunks are in `resend`: bounds it by the chunk count
    std::vector<uint8_t> via;     // the stream each chunk last went on (chunks < next)

    bool requeue(uint32_t index, uint32_t count);  // into `resend`; false if there already
  };
  struct Incoming {
    ReceiveState state = ReceiveState::kEmpty;
    uint64_t incarnation = 0;
    uint64_t total = 0;
    uint32_t count = 0;
    std::vector<uint8_t> data;
    std::vector<bool> have;
    uint32_t have_count = 0;
    uint32_t kind = 0;  // as the sender declared it
    Clock::time_point done_at;
  };
  struct Round {
    Key key;
    Stage stage = Stage::kAhead;
    core::MessageKind kind = core::MessageKind::kModelUpdate;
    std::shared_ptr<std::vector<uint8_t>> payload;
    uint32_t chunk_count = 0;
    std::vector<Outgoing> out;     // per site (own index unused)
    std::vector<Incoming> in;      // per site
    std::vector<bool> in_refused;  // per site: this site refused its payload (continue: not waited for)
    std::vector<bool> used;        // per site, once delivered: its payload is in the result
    std::vector<PeerMetrics> metrics;
    std::string failure;  // why it fails (wait: a refusal either way); once failed: stop sending
    Clock::time_point start;
    Clock::time_point next_wait_log;
    bool said_waiting = false;

    bool local() const { return stage != Stage::kAhead; }
    // Site i refused our payload or we refused its: both sides leave the
    // other's payload out of this round, so they use the same set.
    bool refusedEitherWay(size_t i) const { return out[i].state == SendState::kRefused || in_refused[i]; }
  };
  // The model-update rounds of one tag completed without one peer (missing,
  // not refused) in one life of it, as spans [lo, hi] keyed by lo. Kept as
  // long as the table lives (at most kMaxLeftOutSpans spans; a freeze of any
  // length is one span): a peer that froze can wake any number of rounds
  // behind, and its late chunks for these rounds get Closed, never Ack.
  struct LeftOut {
    uint64_t incarnation = 0;  // the peer's life then; 0: never heard (any life)
    std::map<uint64_t, uint64_t> spans;
    bool told = false;         // the parting noted once already
    bool has(uint64_t round, uint64_t life) const;
    void add(uint64_t round);
  };

  Round& newRound(const Key& key, Clock::time_point now);
  void requeueStream(Round& r, size_t peer, int stream);
  Round* local(const Key& key);  // this site's round, open, finishing or parked; nullptr if none
  bool answeredLeftOut(size_t peer, const wire::Chunk& c, Effects& fx);
  void refuseChunk(size_t peer, const Key& key, std::map<Key, Round>::iterator it, const std::string& bad, bool flood,
                   Effects& fx);
  void retireParked(Clock::time_point now);  // max(): only those nobody waits for
  void tickOpen(Round& r, Clock::time_point now, const PeerTable& peers, Effects& fx);
  void complete(Round& r, const std::vector<size_t>& missing, Clock::time_point now, const PeerTable& peers,
                Effects& fx);
  void fail(Round& r, std::exception_ptr e, Effects& fx);
  void noteParted(size_t peer, const Key& key, const std::string& how, Effects& fx) const;
  std::string names(const std::vector<size_t>& sites) const;
  std::string where(const Key& key) const;

  RoundRules rules_;
  Buffers buffers_;
  std::map<Key, Round> rounds_;
  std::map<Key, std::string> refused_;          // wait: bad payloads for keys not opened yet
  std::deque<Key> refused_order_;
  std::map<Key, std::set<size_t>> refused_in_;  // continue: peers refused in keys not opened yet
  // Done rounds (slot freed, in finished_) whose payload a peer that went
  // silent may not have: resent when it is welcomed again in the same life.
  std::map<Key, Round> parked_;
  std::deque<Key> parked_order_;
  std::set<Key> finished_;                      // the last 16 x max_rounds_in_flight done
  std::deque<Key> finished_order_;
  std::map<std::pair<std::string, size_t>, LeftOut> left_out_;  // (tag, peer)
};

// Offers the chunk to the streams from firstStream() on, in turn, until one
// takes it: `take(k)` puts it on stream k (false: k is down or its queue is
// full). Returns the stream, or RoundTable::kFull if none took it.
template <class Take>
int putOnAStream(const ChunkToSend& c, size_t streams, Take take) {
  for (size_t tried = 0; tried < streams; ++tried) {
    const size_t k = (firstStream(c, streams) + tried) % streams;
    if (take(k)) return int(k);
  }
  return RoundTable::kFull;
}

}  // namespace strait::transport
