#include "transport/impl/round_table.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "transport/checksum.h"
#include "transport/impl/frame.h"

namespace strait::transport {

using core::MessageKind;

namespace {

constexpr size_t kMaxRefusedKeys = 256;  // refusals remembered for rounds not opened yet
constexpr size_t kMaxLeftOutSpans = 256;

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

RoundRules RoundRules::of(const GatewayOptions& o, size_t self) {
  RoundRules r;
  for (const SiteEndpoint& s : o.sites) r.sites.push_back(s.name);
  r.self = self;
  r.chunk_bytes = o.chunk_bytes;
  r.max_message_bytes = o.max_message_bytes;
  r.max_rounds_in_flight = o.max_rounds_in_flight;
  r.on_site_loss = o.on_site_loss;
  r.peer_timeout = o.peer_timeout;
  r.round_deadline = o.round_deadline;
  r.hard_deadline = o.hard_deadline;
  return r;
}

bool RoundTable::LeftOut::has(uint64_t round, uint64_t life) const {
  if (incarnation != 0 && incarnation != life) return false;
  auto it = spans.upper_bound(round);
  return it != spans.begin() && std::prev(it)->second >= round;
}

void RoundTable::LeftOut::add(uint64_t round) {
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

RoundTable::RoundTable(RoundRules rules, Buffers buffers) : rules_(std::move(rules)), buffers_(std::move(buffers)) {}

std::string RoundTable::where(const Key& key) const {
  return "round " + std::to_string(key.first) + " '" + key.second + "'";
}

std::string RoundTable::names(const std::vector<size_t>& sites) const {
  std::string s;
  for (size_t i : sites) s += (s.empty() ? "" : ", ") + rules_.sites[i];
  return s;
}

RoundTable::Round& RoundTable::newRound(const Key& key, Clock::time_point now) {
  Round& r = rounds_[key];
  const size_t n = rules_.sites.size();
  r.key = key;
  r.out.resize(n);
  r.in.resize(n);
  r.in_refused.assign(n, false);
  r.metrics.resize(n);
  for (size_t i = 0; i < n; ++i) r.metrics[i].site = rules_.sites[i];
  r.start = now;
  r.next_wait_log = now + rules_.round_deadline;
  return r;
}

RoundTable::Round* RoundTable::local(const Key& key) {
  auto it = rounds_.find(key);
  if (it != rounds_.end()) return it->second.local() ? &it->second : nullptr;
  auto parked = parked_.find(key);
  return parked != parked_.end() ? &parked->second : nullptr;
}

std::string RoundTable::open(const Key& key, MessageKind kind, std::shared_ptr<std::vector<uint8_t>> payload,
                             Clock::time_point now) {
  if (finished_.count(key)) {
    return "exchange: round " + std::to_string(key.first) + " tag '" + key.second + "' was already exchanged";
  }
  auto it = rounds_.find(key);
  Round& r = it != rounds_.end() ? it->second : newRound(key, now);
  r.stage = Stage::kOpen;
  r.start = now;
  r.next_wait_log = now + rules_.round_deadline;
  r.payload = std::move(payload);
  r.kind = kind;
  auto refused = refused_.find(key);
  if (refused != refused_.end()) r.failure = refused->second;
  auto refused_in = refused_in_.find(key);
  if (refused_in != refused_in_.end()) {
    for (size_t i : refused_in->second) r.in_refused[i] = true;
    refused_in_.erase(refused_in);
  }
  r.chunk_count = uint32_t(chunkCount(r.payload->size(), rules_.chunk_bytes));
  return "";
}

// ------------------------------------------------------------ incoming ---

void RoundTable::noteParted(size_t peer, const Key& key, const std::string& how, Effects& fx) const {
  fx.logs.push_back(where(key) + ": " + how + ": the two sites now hold different state");
  fx.parted.push_back(peer);
}

// A chunk for a round this site completed without its sender: Closed, the
// parting noted once per tag and life (its later chunks get Closed too).
bool RoundTable::answeredLeftOut(size_t peer, const wire::Chunk& c, Effects& fx) {
  if (left_out_.empty()) return false;
  auto it = left_out_.find({c.tag(), peer});
  if (it == left_out_.end() || !it->second.has(c.round(), c.incarnation())) return false;
  fx.replies.push_back(closedEnvelope(c.round(), c.tag(), c.incarnation()));
  if (!it->second.told) {
    it->second.told = true;
    noteParted(peer, {c.round(), c.tag()},
               "site '" + rules_.sites[peer] + "' sent its payload after this site had closed the round without it",
               fx);
  }
  return true;
}

void RoundTable::chunk(size_t peer, uint64_t life, const wire::Chunk& c, const uint8_t* data, size_t size,
                       Clock::time_point now, Effects& fx) {
  // Only the incarnation that said Hello may send: a stale or forged one
  // could otherwise make us drop and reallocate buffers at will.
  if (c.incarnation() != life) return;
  const Key key{c.round(), c.tag()};
  if (answeredLeftOut(peer, c, fx)) return;
  if (finished_.count(key)) {  // stale or duplicate: it may have missed our Ack
    fx.replies.push_back(ackEnvelope(c.round(), c.tag()));
    return;
  }
  auto it = rounds_.find(key);
  if (it != rounds_.end() && it->second.in[peer].state == ReceiveState::kComplete) {
    // Whatever it holds, a chunk of a payload that is already in changes
    // nothing (PROTOCOL.md): our Ack may have been lost, acknowledge again.
    fx.replies.push_back(ackEnvelope(c.round(), c.tag()));
    return;
  }
  // Layout checks before anything is allocated.
  const uint64_t total = c.total_bytes();
  std::string bad = checkChunk(c, size, ChunkLimits{rules_.chunk_bytes, rules_.max_message_bytes});
  bool flood = false;
  if (bad.empty() && (it == rounds_.end() || !it->second.local()) &&
      (it == rounds_.end() || it->second.in[peer].state == ReceiveState::kEmpty)) {
    // Each peer may open only a few keys this site has not reached yet, so
    // one flooding peer can neither exhaust memory nor crowd out the others.
    size_t ahead = 0;
    for (const auto& kv : rounds_) ahead += !kv.second.local() && kv.second.in[peer].state != ReceiveState::kEmpty;
    if (ahead >= size_t(2 * rules_.max_rounds_in_flight)) {
      bad = "too many rounds opened ahead of this site (" + std::to_string(ahead) + " from this peer)";
      flood = true;
    }
  }
  if (!bad.empty()) {
    refuseChunk(peer, key, it, bad, flood, fx);
    return;
  }
  Round& r = it != rounds_.end() ? it->second : newRound(key, now);
  Incoming& in = r.in[peer];  // not complete: see above
  if (in.state == ReceiveState::kEmpty || in.incarnation != c.incarnation()) {
    in = Incoming{};
    in.state = ReceiveState::kPartial;
    in.incarnation = c.incarnation();
    in.total = total;
    in.count = c.count();
    in.kind = c.kind();
    if (buffers_) in.data = buffers_(total);  // empty unless one is held already: see below
  }
  if (in.total != total || in.count != c.count()) {
    fx.replies.push_back(refuseEnvelope(c.round(), c.tag(), "chunk layout changed within one payload"));
    return;
  }
  if (c.index() < in.have.size() && in.have[c.index()]) return;
  if (chunkChecksum(data, size) != c.xxh3()) {
    fx.logs.push_back("chunk " + std::to_string(c.index()) + " of " + where(key) + " from '" + rules_.sites[peer] +
                      "' failed its checksum: asking for it again");
    fx.replies.push_back(nackEnvelope(c.round(), c.tag(), c.index()));
    return;
  }
  // Memory follows the bytes that arrived, not the size the first chunk
  // claims: the whole payload is reserved at the first chunk, which costs
  // address space, not memory (an allocation this large is a fresh mapping
  // whose pages become resident when written), and the buffer grows over
  // what arrived. So a peer that announces 1 GiB and sends one chunk costs
  // one chunk, and a payload of many GB is never copied to a larger buffer
  // on the I/O thread (which stalled heartbeats for seconds and held the
  // old and the new buffer at once). What a chunk far ahead of the others
  // costs: the gap before it is zeroed, at most `total` (<= max_message_bytes).
  const uint64_t offset = uint64_t(c.index()) * rules_.chunk_bytes;
  const uint64_t end = offset + size;
  try {
    if (in.data.size() < end) {
      if (in.data.capacity() < total) in.data.reserve(total);
      in.data.resize(end);
    }
    if (in.have.size() <= c.index()) in.have.resize(c.index() + 1, false);
  } catch (const std::bad_alloc&) {
    in = Incoming{};
    fx.logs.push_back("cannot allocate " + std::to_string(end) + " bytes for " + where(key) + " from '" +
                      rules_.sites[peer] + "'");
    fx.replies.push_back(refuseEnvelope(c.round(), c.tag(), "the receiver cannot allocate the payload"));
    return;
  }
  if (size > 0) std::memcpy(in.data.data() + offset, data, size);
  in.have[c.index()] = true;
  r.metrics[peer].bytes_received += size;
  if (++in.have_count == in.count) {
    in.state = ReceiveState::kComplete;
    in.done_at = now;
    fx.replies.push_back(ackEnvelope(c.round(), c.tag()));
  }
}

void RoundTable::refuseChunk(size_t peer, const Key& key, std::map<Key, Round>::iterator it, const std::string& bad,
                             bool flood, Effects& fx) {
  fx.logs.push_back("refused " + where(key) + " from '" + rules_.sites[peer] + "': " + bad);
  fx.replies.push_back(refuseEnvelope(key.first, key.second, bad));
  const bool local = it != rounds_.end() && it->second.local();
  // With `continue` the site simply counts as missing for this round (and
  // is not waited for: it will not send the payload again). With `wait`
  // nothing good can come any more: fail the round now, with the reason,
  // instead of at the hard deadline.
  if (rules_.on_site_loss == OnSiteLoss::kContinue) {
    if (local) {
      it->second.in_refused[peer] = true;
    } else if (refused_in_[key].insert(peer).second && refused_in_.size() > kMaxRefusedKeys) {
      refused_in_.erase(refused_in_.begin());  // the oldest round numbers first
    }
  } else if (!flood) {
    const std::string why = "site '" + rules_.sites[peer] + "' sent a bad payload: " + bad;
    if (local) {
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
}

// ------------------------------------------------- answers to our sends ---

void RoundTable::ack(size_t peer, const Key& key) {
  Round* r = local(key);
  if (r == nullptr) return;
  Outgoing& o = r->out[peer];
  if (o.state == SendState::kSending || o.state == SendState::kParked) o.state = SendState::kAcked;
}

void RoundTable::nack(size_t peer, const Key& key, uint32_t index) {
  Round* found = local(key);
  if (found == nullptr || index >= found->chunk_count) return;
  Round& r = *found;
  Outgoing& o = r.out[peer];
  if (o.state != SendState::kSending) return;
  if (o.requeue(index, r.chunk_count)) r.metrics[peer].retransmissions++;
}

bool RoundTable::Outgoing::requeue(uint32_t index, uint32_t count) {
  if (queued.size() != count) queued.assign(count, false);
  if (queued[index]) return false;
  queued[index] = true;
  resend.push_back(index);
  return true;
}

void RoundTable::refused(size_t peer, uint64_t life, const Key& key, const std::string& reason, Effects& fx) {
  Round* found = local(key);
  if (found == nullptr) return;
  Round& r = *found;
  const std::string why = "site '" + rules_.sites[peer] + "' refused our payload: " + reason;
  if (r.stage == Stage::kDelivered || r.stage == Stage::kFailed) {
    // Rounds complete on receipt, so the refusal can come after this site
    // completed the round. With the refuser's payload in our result and
    // ours not in its, the two now differ: both must know.
    Outgoing& o = r.out[peer];
    if (o.state == SendState::kRefused || o.state == SendState::kClosed) return;
    o.state = SendState::kRefused;
    if (r.stage == Stage::kDelivered && r.used[peer]) {
      fx.replies.push_back(closedEnvelope(key.first, key.second, life));
      noteParted(peer, key, why + ", after this site had completed the round with its payload", fx);
    } else {
      fx.logs.push_back(where(key) + ": " + why);
    }
    return;
  }
  if (rules_.on_site_loss == OnSiteLoss::kContinue) {
    // The peer goes on without our payload; this site goes on without the
    // peer in this round (it counts as missing).
    Outgoing& o = r.out[peer];
    if (o.state != SendState::kRefused) fx.logs.push_back(where(key) + ": " + why);
    o.state = SendState::kRefused;
  } else {
    r.failure = why;
  }
}

void RoundTable::closed(size_t peer, const Key& key, Effects& fx) {
  // Parked rounds too: after a partition under `continue` each side's
  // payloads for the other were parked and sent again once healed, and the
  // Closed they got was dropped, so a closing gateway waited for them until
  // each round's hard deadline (60 s in the chaos suite, not 3.6).
  if (Round* r = local(key)) {
    Outgoing& o = r->out[peer];
    if (o.state == SendState::kClosed) return;
    // Not waited for any more, and its payload (if here) is not used: it
    // did not use ours.
    o.state = SendState::kClosed;
  }
  noteParted(peer, key, "site '" + rules_.sites[peer] + "' had closed the round without this site's payload", fx);
}

// ------------------------------------------------------- peers' lives ---

void RoundTable::welcomed(size_t peer, int stream) {
  for (auto* table : {&rounds_, &parked_}) {
    for (auto& kv : *table) {
      Round& r = kv.second;
      if (!r.local()) continue;
      Outgoing& o = r.out[peer];
      if (o.state == SendState::kParked) {
        // Back in the same life after a silence: all of it again.
        o = Outgoing{};
        continue;
      }
      if (o.state != SendState::kSending) continue;
      requeueStream(r, peer, stream);
    }
  }
}

void RoundTable::streamLost(size_t peer, int stream) {
  for (auto* table : {&rounds_, &parked_}) {
    for (auto& kv : *table) {
      Round& r = kv.second;
      if (r.local() && r.out[peer].state == SendState::kSending) requeueStream(r, peer, stream);
    }
  }
}

// Chunks that last went on `stream` go again: a broken connection may have
// lost any of them (ZeroMQ does not resend what was in flight), and acks
// are per payload, so which arrived is not known. Receivers ignore
// duplicates.
void RoundTable::requeueStream(Round& r, size_t peer, int stream) {
  Outgoing& o = r.out[peer];
  const uint32_t sent = std::min<uint32_t>(o.next, uint32_t(o.via.size()));
  for (uint32_t i = 0; i < sent; ++i) {
    if (o.via[i] == uint8_t(stream) && o.requeue(i, r.chunk_count)) r.metrics[peer].retransmissions++;
  }
}

void RoundTable::newLife(size_t peer, uint64_t life, bool restarted, Effects& fx) {
  if (restarted) {
    // Its new life lost whatever its old one acknowledged. (Not on the
    // first Hello: what is already on its way to it is still good.)
    fx.logs.push_back("site '" + rules_.sites[peer] + "' restarted: resending this site's open payloads");
    for (auto& kv : rounds_) {
      if (!kv.second.local()) continue;
      Outgoing& o = kv.second.out[peer];
      // Delivered rounds too (on receipt, its old life's payload was here):
      // a new life that starts at that round needs ours again.
      if (o.state == SendState::kSending || o.state == SendState::kAcked) o = Outgoing{};
    }
  }
  // A finished round's payload is for the life that missed it, not a new one
  // (a restarted site rejoins by state transfer).
  for (auto& kv : parked_) {
    Outgoing& o = kv.second.out[peer];
    if (o.state == SendState::kParked || o.state == SendState::kSending) o.state = SendState::kGaveUp;
  }
  retireParked(Clock::time_point::max());
  // Payloads from its previous life are void in rounds not completed here:
  // partial ones are useless, and a whole one may no longer be what its new
  // life sends for that round (a rejoining site takes part without a
  // contribution). Both sides must use the same payloads.
  for (auto& kv : rounds_) {
    if (kv.second.stage == Stage::kDelivered || kv.second.stage == Stage::kFailed) continue;
    Incoming& in = kv.second.in[peer];
    if (in.state != ReceiveState::kEmpty && in.incarnation != life) in = Incoming{};
  }
}

// -------------------------------------------------------------- sends ---

bool RoundTable::hasWork(size_t peer) const {
  for (const auto* table : {&rounds_, &parked_}) {
    for (const auto& kv : *table) {
      const Round& r = kv.second;
      if (!r.local()) continue;
      const Outgoing& o = r.out[peer];
      if (o.state == SendState::kSending && (o.next < r.chunk_count || !o.resend.empty())) return true;
    }
  }
  return false;
}

void RoundTable::send(size_t peer, const Send& send) {
  bool progress = true;
  while (progress) {
    progress = false;
    for (auto it = rounds_.begin(), parked = parked_.begin(); it != rounds_.end() || parked != parked_.end();) {
      Round& r = it != rounds_.end() ? (it++)->second : (parked++)->second;
      if (!r.local()) continue;
      Outgoing& o = r.out[peer];
      if (o.state != SendState::kSending) continue;
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
      const uint64_t offset = uint64_t(index) * rules_.chunk_bytes;
      const size_t bytes = size_t(std::min<uint64_t>(rules_.chunk_bytes,
                                                     r.payload->size() - std::min<uint64_t>(offset, r.payload->size())));
      const int stream = send(ChunkToSend{r.key, r.kind, r.payload, index, r.chunk_count, offset, bytes, retry});
      if (stream == kFull) return;
      if (o.via.size() != r.chunk_count) o.via.assign(r.chunk_count, 0);
      o.via[index] = uint8_t(stream);
      r.metrics[peer].bytes_sent += bytes;
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

// ---------------------------------------------------------- the clock ---

void RoundTable::tick(Clock::time_point now, const PeerTable& peers, Effects& fx) {
  std::vector<Key> retire, stale;
  for (auto& kv : rounds_) {
    Round& r = kv.second;
    if (!r.local()) {
      // A peer ran ahead into a round this site never opened: give its
      // buffers back once the hard deadline has passed.
      if (now >= r.start + rules_.hard_deadline) stale.push_back(kv.first);
      continue;
    }
    if (r.stage == Stage::kOpen) tickOpen(r, now, peers, fx);
    if (r.stage == Stage::kOpen) continue;
    // Keep sending to peers that have not acknowledged, unless the hard
    // deadline passed or the round failed. A peer that went silent is not
    // waited for: the round is retired (its slot freed) but parked with its
    // payload, which the peer may not have (the link may have been cut
    // just after this site got the peer's payload, losing its own chunks
    // and the Ack), and resent if the peer comes back in the same life.
    bool pending = false, park = false;
    for (size_t i : peers.peers()) {
      Outgoing& o = r.out[i];
      if (o.state != SendState::kSending) continue;
      if (now >= r.start + rules_.hard_deadline || !r.failure.empty()) {
        o.state = SendState::kGaveUp;
      } else if (peers.silent(i, now)) {
        o.state = SendState::kParked;
        park = true;
      } else {
        pending = true;
      }
    }
    if (!pending) retire.push_back(kv.first);
    if (!pending && park) {
      parked_order_.push_back(kv.first);
      parked_.emplace(kv.first, std::move(r));
    }
  }
  for (auto& kv : parked_) {
    for (size_t i : peers.peers()) {
      Outgoing& o = kv.second.out[i];
      if (o.state != SendState::kParked || peers.silent(i, now)) continue;
      o = Outgoing{};  // heard again: from the first chunk (duplicates are ignored there)
    }
  }
  retireParked(now);
  for (const Key& k : stale) rounds_.erase(k);
  for (const Key& k : retire) {
    rounds_.erase(k);
    finished_.insert(k);
    finished_order_.push_back(k);
    while (finished_order_.size() > size_t(16 * rules_.max_rounds_in_flight)) {
      finished_.erase(finished_order_.front());
      finished_order_.pop_front();
    }
    fx.done.push_back(k);
  }
}

// Parked rounds go once every peer acknowledged or was given up, at the
// hard deadline, and beyond max_rounds_in_flight of them (oldest first).
void RoundTable::retireParked(Clock::time_point now) {
  auto over = [&](const Round& r) {
    if (now != Clock::time_point::max() && now >= r.start + rules_.hard_deadline) return true;
    for (size_t i = 0; i < r.out.size(); ++i) {
      const SendState st = r.out[i].state;
      if (i != rules_.self && (st == SendState::kSending || st == SendState::kParked)) return false;
    }
    return true;
  };
  for (auto it = parked_order_.begin(); it != parked_order_.end();) {
    auto r = parked_.find(*it);
    const bool evict = parked_.size() > size_t(rules_.max_rounds_in_flight);
    if (r == parked_.end() || evict || over(r->second)) {
      if (r != parked_.end()) parked_.erase(r);
      it = parked_order_.erase(it);
    } else {
      ++it;
    }
  }
}

void RoundTable::tickOpen(Round& r, Clock::time_point now, const PeerTable& peers, Effects& fx) {
  if (!r.failure.empty()) {
    fail(r, std::make_exception_ptr(ProtocolError(where(r.key) + ": " + r.failure)), fx);
    return;
  }
  const bool go_on = rules_.on_site_loss == OnSiteLoss::kContinue;
  // Done on receipt: when every peer's payload is here (PROTOCOL.md). Our
  // own payload may still be on its way to them; the round goes on sending
  // it after delivery until each peer acknowledges it, goes silent (parked)
  // or the hard deadline passes, and a closing gateway lingers for exactly
  // that (Gateway::Impl::linger). Waiting for the acknowledgements too cost
  // every round a second one-way trip.
  std::vector<size_t> missing, waiting;
  for (size_t i : peers.peers()) {
    const bool refused = r.refusedEitherWay(i);
    const bool closed = r.out[i].state == SendState::kClosed;  // it went on without us
    const bool in = r.in[i].state == ReceiveState::kComplete && !refused && !closed;
    if (!in) missing.push_back(i);
    // With `continue`, a site that was up and went silent is not waited
    // for: the round goes on without it at once instead of at the round
    // deadline (a site never heard from still gets the round deadline to
    // come up).
    // A site that said it stopped is not waited for either, not even for
    // its acknowledgement.
    const bool stopped = go_on && !peers.gone(i).empty();
    const bool gone = go_on && (peers.lost(i, now) || refused || closed || stopped);
    if (!in && !gone) waiting.push_back(i);
  }
  const double age = seconds(now - r.start);
  // Why missing sites are not taking part, when they said so (Stopped) or
  // this site refused their handshake; only the refused ones fail a round
  // under `wait` at once: they cannot take part in this life, while a site
  // that stopped may restart.
  std::string refused_here;
  for (size_t i : go_on ? missing : waiting) {
    const bool in = r.in[i].state == ReceiveState::kComplete;
    if (in || peers.gone(i).empty()) continue;
    const std::string why = "site '" + rules_.sites[i] + "' " + peers.gone(i);
    // A grace of peer_timeout: when both sites refuse each other, the
    // refusal of this site's own Hello (fatal here) says it first.
    if (!peers.at(i).refused.empty() && now - peers.at(i).refused_at >= rules_.peer_timeout) {
      refused_here += (refused_here.empty() ? "" : "; ") + why;
    }
  }
  // A large payload of ours completes the round only once every peer that
  // sent its own has acknowledged ours too (or stopped, was refused, has
  // been silent for twice the peer timeout, or the hard deadline came):
  // delivering it earlier hands the application a copy of it (the round
  // goes on sending the original), which for many GB costs more memory,
  // and I/O-thread time, than the one-way trip saved. Twice, as a closing
  // gateway's linger: a peer busy filling GBs under load looked lost for a
  // moment and cost a 3 GiB copy (3.1x the payload in memory).
  bool owe_ack = false;
  if (waiting.empty() && r.payload && r.payload->size() > kCompleteOnReceiptMaxBytes &&
      now < r.start + rules_.hard_deadline) {
    for (size_t i : peers.peers()) {
      const bool in = std::find(missing.begin(), missing.end(), i) == missing.end();
      const PeerState& p = peers.at(i);
      const bool given_up = !p.refused.empty() || !p.stopped.empty() ||
                            (p.greeted && now - p.last_heard >= 2 * rules_.peer_timeout);
      owe_ack = owe_ack || (in && r.out[i].state == SendState::kSending && !given_up);
    }
  }
  if (waiting.empty() && owe_ack) {
    // Nothing to do but send and wait for the acknowledgements.
  } else if (waiting.empty()) {
    if (!missing.empty()) {
      // Each missing site with its own reason: a site that refused this
      // round is not silent, and saying so sent a reader the wrong way.
      std::string why;
      for (size_t i : missing) {
        const std::string site = "site '" + rules_.sites[i] + "'";
        const std::string reason =
            !peers.gone(i).empty()                     ? peers.gone(i)
            : r.out[i].state == SendState::kRefused    ? "refused our payload"
            : r.in_refused[i]                          ? "had its payload refused here"
            : r.out[i].state == SendState::kClosed     ? "went on without us"
            : peers.lost(i, now)                       ? "silent for " + fmt(rules_.peer_timeout.count() / 1000.0) +
                                                             " s or more"
                                                       : "not heard from yet";
        why += (why.empty() ? "" : "; ") + site + " " + reason;
      }
      fx.logs.push_back(where(r.key) + ": continuing without " + names(missing) + " (" + why + ")");
    }
    complete(r, missing, now, peers, fx);
  } else if (!go_on && !refused_here.empty()) {
    fail(r, std::make_exception_ptr(ProtocolError(where(r.key) + ": " + refused_here)), fx);
  } else if (now >= r.start + rules_.round_deadline && go_on) {
    if (!missing.empty()) {
      fx.logs.push_back(where(r.key) + ": continuing without " + names(missing) + " after " + fmt(age) + " s");
    }
    complete(r, missing, now, peers, fx);
  } else if (now >= r.start + rules_.hard_deadline) {
    fail(r,
         std::make_exception_ptr(TimeoutError(where(r.key) + ": no payload from " + names(waiting) +
                                              " within the hard deadline of " +
                                              fmt(rules_.hard_deadline.count() / 1000.0) + " s (" +
                                              peers.silence(waiting, now) + ")")),
         fx);
  } else if (now >= r.next_wait_log ||
             (!r.said_waiting && std::any_of(waiting.begin(), waiting.end(), [&](size_t i) {
                return peers.lost(i, now) || !peers.gone(i).empty() || !peers.at(i).trouble.empty();
              }))) {
    // Said at once when a site we wait for is gone, then every round deadline.
    r.said_waiting = true;
    fx.logs.push_back(where(r.key) + ": waiting for " + names(waiting) + " (" + peers.silence(waiting, now) +
                      "); giving up at the hard deadline in " +
                      fmt(rules_.hard_deadline.count() / 1000.0 - age) + " s");
    r.next_wait_log = now + rules_.round_deadline;
  }
}

void RoundTable::complete(Round& r, const std::vector<size_t>& missing, Clock::time_point now, const PeerTable& peers,
                          Effects& fx) {
  // Who this round went on without (not who refused: both sides leave a
  // refused payload out). A late chunk of theirs gets Closed, not Ack.
  // Model updates only: a join's or a digest's round left out is no parting
  // (the updates' rounds say it).
  for (size_t i : missing) {
    if (r.refusedEitherWay(i)) continue;
    // Whatever it sent for this round is not in the result: a chunk still to
    // come must not complete it and be acknowledged.
    if (r.in[i].state == ReceiveState::kComplete) r.in[i].state = ReceiveState::kPartial;
    if (r.kind != MessageKind::kModelUpdate) continue;
    LeftOut& lo = left_out_[{r.key.second, i}];
    const uint64_t life = peers.at(i).greeted ? peers.at(i).incarnation : 0;
    if (lo.incarnation != life) lo = LeftOut{life, {}, false};
    lo.add(r.key.first);
    if (lo.spans.size() > kMaxLeftOutSpans) lo.spans.erase(lo.spans.begin());
  }
  Delivery d;
  RoundResult& res = d.result;
  res.round = r.key.first;
  res.tag = r.key.second;
  res.seconds = seconds(now - r.start);
  res.payloads.resize(rules_.sites.size());
  d.kinds.assign(rules_.sites.size(), MessageKind::kModelUpdate);
  for (size_t i : missing) res.missing.push_back(rules_.sites[i]);
  // Once every peer has acknowledged, nothing will be sent again and no
  // frame borrows the payload any more: hand it back without a copy.
  bool delivered = true;
  for (size_t i = 0; i < rules_.sites.size(); ++i) {
    if (i != rules_.self) delivered = delivered && r.out[i].state == SendState::kAcked;
  }
  if (delivered && r.payload.use_count() == 1) {
    res.payloads[rules_.self] = std::move(*r.payload);
    r.payload = std::make_shared<std::vector<uint8_t>>();
  } else {
    res.payloads[rules_.self] = *r.payload;
  }
  r.used.assign(rules_.sites.size(), false);
  r.used[rules_.self] = true;
  for (size_t i = 0; i < rules_.sites.size(); ++i) {
    if (i == rules_.self) continue;
    Incoming& in = r.in[i];
    PeerMetrics m = r.metrics[i];
    // Still sending to it (on receipt, its acknowledgement may be a trip
    // away): what the round sends it, the payload whole and the chunks
    // asked for again so far, not however much of it has left yet.
    const uint64_t first_pass = std::min<uint64_t>(uint64_t(r.out[i].next) * rules_.chunk_bytes, r.payload->size());
    if (r.out[i].state == SendState::kSending && r.metrics[i].bytes_sent >= first_pass) {
      m.bytes_sent = r.metrics[i].bytes_sent - first_pass + r.payload->size();
    }
    if (in.state == ReceiveState::kComplete && !r.refusedEitherWay(i) && r.out[i].state != SendState::kClosed) {
      const double secs = std::max(1e-9, seconds(in.done_at - r.start));
      m.goodput_mbps = 8.0 * double(in.total) / secs / 1e6;
      d.kinds[i] = MessageKind(in.kind);  // checkChunk: a known kind
      res.payloads[i] = std::move(in.data);
      r.used[i] = true;
    } else {
      m.missing = true;
    }
    res.peers.push_back(m);
  }
  r.stage = Stage::kDelivered;
  fx.delivered.push_back(std::move(d));
}

void RoundTable::fail(Round& r, std::exception_ptr e, Effects& fx) {
  r.stage = Stage::kFailed;
  if (r.failure.empty()) r.failure = "failed";
  fx.failed.emplace_back(r.key, std::move(e));
}

void RoundTable::failAll(std::exception_ptr e, bool forget, Effects& fx) {
  for (auto& kv : rounds_) {
    if (kv.second.stage == Stage::kOpen) fail(kv.second, e, fx);
  }
  if (forget) rounds_.clear();
}

std::vector<size_t> RoundTable::awaitingAcks(Clock::time_point now, const PeerTable& peers,
                                             Clock::duration silence_grace) const {
  std::vector<size_t> out;
  for (size_t i : peers.peers()) {
    if (!peers.gone(i).empty()) continue;
    // A silent peer may only be stalled (a busy machine, a link that
    // flapped): it is waited for until it has been silent for the grace.
    if (peers.silent(i, now) && now - peers.at(i).last_heard > silence_grace) continue;
    bool owed = false;
    for (const auto& kv : rounds_) {
      owed = owed || (kv.second.stage == Stage::kDelivered && kv.second.out[i].state == SendState::kSending);
    }
    // A round parked while the peer was silent is owed too: it resumes
    // when the peer is heard again.
    for (const auto& kv : parked_) {
      owed = owed || kv.second.out[i].state == SendState::kSending || kv.second.out[i].state == SendState::kParked;
    }
    if (owed) out.push_back(i);
  }
  return out;
}

std::vector<PeerRound> RoundTable::openedByPeers() const {
  std::vector<PeerRound> out;
  for (const auto& kv : rounds_) {
    if (kv.second.local()) continue;
    for (size_t i = 0; i < rules_.sites.size(); ++i) {
      if (i != rules_.self && kv.second.in[i].state != ReceiveState::kEmpty) {
        out.push_back({kv.first.first, kv.first.second, rules_.sites[i]});
      }
    }
  }
  return out;
}

}  // namespace strait::transport
