#include "transport/impl/frame.h"

#include <algorithm>
#include <climits>

#include "transport/gateway.h"

namespace strait::transport {

namespace {

std::string hex(const std::string& bytes, size_t max = 8) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < bytes.size() && i < max; ++i) {
    s += d[uint8_t(bytes[i]) >> 4];
    s += d[uint8_t(bytes[i]) & 15];
  }
  return s;
}

}  // namespace

std::string parseMessage(const FrameView* frames, size_t count, Message* out) {
  if (count == 0) return "no frames";
  // ParseFromArray takes an int; ZMQ_MAXMSGSIZE keeps real frames far below.
  if (frames[0].size > size_t(INT_MAX) ||
      !out->envelope.ParseFromArray(frames[0].data, static_cast<int>(frames[0].size))) {
    return "not a protocol envelope";
  }
  out->has_data = count > 1;
  out->data = out->has_data ? frames[1] : FrameView{};
  return "";
}

std::string checkHello(const wire::Hello& h, const char* user, const HelloTerms& terms) {
  if (h.protocol_version() != kProtocolVersion) {
    return "protocol version " + std::to_string(h.protocol_version()) + " is not supported (this gateway speaks " +
           std::to_string(kProtocolVersion) + ")";
  }
  if (h.job_id() != terms.job_id) {
    return "job id '" + h.job_id() + "' differs from this site's job '" + terms.job_id + "'";
  }
  if (h.site() == terms.self) {
    return "site '" + h.site() + "' is this site: a second gateway runs as '" + h.site() +
           "' (check the --site / STRAIT_SITE each gateway was started with)";
  }
  const auto at = std::find(terms.peers.begin(), terms.peers.end(), h.site());
  if (at == terms.peers.end()) {
    return "site '" + h.site() + "' is not a site of job '" + terms.job_id + "'";
  }
  if (terms.curve && (user == nullptr || h.site() != user)) {
    return "site '" + h.site() + "' connected with the key of '" + std::string(user ? user : "?") + "'";
  }
  const size_t i = size_t(at - terms.peers.begin());
  if (i < terms.jurisdictions.size() && h.jurisdiction() != terms.jurisdictions[i]) {
    return "site '" + h.site() + "' says its jurisdiction is '" + h.jurisdiction().substr(0, 64) +
           "', the job config says '" + terms.jurisdictions[i] + "'";
  }
  if (h.config_fingerprint() != terms.config_fingerprint) {
    return "config fingerprint " + hex(h.config_fingerprint()) + "... differs from this site's " +
           hex(terms.config_fingerprint) +
           "...: every site must run the same job config (only key file paths and bind may differ)";
  }
  if (h.stream() >= terms.streams) {
    return "stream " + std::to_string(h.stream()) + " is beyond this job's transport.streams = " +
           std::to_string(terms.streams);
  }
  return "";
}

std::string checkWelcome(const wire::Welcome& w, const std::string& peer) {
  if (w.accepted()) return "";
  return "site '" + peer + "' refused our handshake: " + w.reason();
}

uint64_t chunkCount(uint64_t total, size_t chunk_bytes) {
  if (total == 0) return 1;
  return total / chunk_bytes + (total % chunk_bytes != 0 ? 1 : 0);
}

std::string checkChunk(const wire::Chunk& c, size_t data_bytes, const ChunkLimits& limits) {
  const uint64_t total = c.total_bytes();
  if (c.tag().size() > kMaxTagBytes) {
    return "tag of " + std::to_string(c.tag().size()) + " bytes exceeds " + std::to_string(kMaxTagBytes);
  }
  if (total > limits.max_message_bytes) {
    return "payload of " + std::to_string(total) + " bytes exceeds max_message_bytes = " +
           std::to_string(limits.max_message_bytes);
  }
  if (c.count() != chunkCount(total, limits.chunk_bytes) || c.index() >= c.count()) {
    return "chunk " + std::to_string(c.index()) + " of " + std::to_string(c.count()) + " does not fit a payload of " +
           std::to_string(total) + " bytes in chunks of " + std::to_string(limits.chunk_bytes);
  }
  // index < count = ceil(total / chunk_bytes), so the offset is below total.
  const uint64_t off = uint64_t(c.index()) * limits.chunk_bytes;
  const uint64_t len = std::min<uint64_t>(limits.chunk_bytes, total - off);
  if (data_bytes != len) {
    return "chunk " + std::to_string(c.index()) + " has " + std::to_string(data_bytes) + " bytes, expected " +
           std::to_string(len);
  }
  // The egress policy and the audit log name what a payload is: a kind
  // this gateway does not know cannot be recorded truthfully, so it is refused.
  if (c.kind() < 1 || c.kind() > 4) {
    return "message kind " + std::to_string(c.kind()) +
           " is not one of 1 (model_update), 2 (model_state), 3 (control), 4 (metrics)";
  }
  return "";
}

wire::Envelope helloEnvelope(const HelloFields& f) {
  wire::Envelope env;
  wire::Hello* h = env.mutable_hello();
  h->set_protocol_version(f.protocol_version);
  h->set_job_id(f.job_id);
  h->set_site(f.site);
  h->set_jurisdiction(f.jurisdiction);
  h->set_config_fingerprint(f.config_fingerprint);
  h->set_incarnation(f.incarnation);
  h->set_stream(f.stream);
  return env;
}

wire::Envelope welcomeEnvelope(const std::string& site, uint64_t incarnation, const std::string& refusal) {
  wire::Envelope env;
  wire::Welcome* w = env.mutable_welcome();
  w->set_site(site);
  w->set_incarnation(incarnation);
  w->set_accepted(refusal.empty());
  if (!refusal.empty()) w->set_reason(refusal);
  return env;
}

wire::Envelope heartbeatEnvelope(uint64_t incarnation) {
  wire::Envelope env;
  env.mutable_heartbeat()->set_incarnation(incarnation);
  return env;
}

wire::Envelope chunkEnvelope(const ChunkHeader& h) {
  wire::Envelope env;
  wire::Chunk* c = env.mutable_chunk();
  c->set_round(h.round);
  c->set_tag(h.tag);
  c->set_incarnation(h.incarnation);
  c->set_index(h.index);
  c->set_count(h.count);
  c->set_total_bytes(h.total_bytes);
  c->set_xxh3(h.xxh3);
  c->set_kind(h.kind);
  return env;
}

wire::Envelope ackEnvelope(uint64_t round, const std::string& tag) {
  wire::Envelope env;
  env.mutable_ack()->set_round(round);
  env.mutable_ack()->set_tag(tag);
  return env;
}

wire::Envelope nackEnvelope(uint64_t round, const std::string& tag, uint32_t index) {
  wire::Envelope env;
  env.mutable_nack()->set_round(round);
  env.mutable_nack()->set_tag(tag);
  env.mutable_nack()->set_index(index);
  return env;
}

wire::Envelope refuseEnvelope(uint64_t round, const std::string& tag, const std::string& why) {
  wire::Envelope env;
  env.mutable_refuse()->set_round(round);
  env.mutable_refuse()->set_tag(tag);
  env.mutable_refuse()->set_reason(why);
  return env;
}

wire::Envelope closedEnvelope(uint64_t round, const std::string& tag, uint64_t incarnation) {
  wire::Envelope env;
  env.mutable_closed()->set_round(round);
  env.mutable_closed()->set_tag(tag);
  env.mutable_closed()->set_incarnation(incarnation);
  return env;
}

wire::Envelope stoppedEnvelope(uint64_t incarnation, const std::string& reason) {
  wire::Envelope env;
  env.mutable_stopped()->set_incarnation(incarnation);
  env.mutable_stopped()->set_reason(reason.substr(0, kMaxReasonBytes));
  return env;
}

}  // namespace strait::transport
