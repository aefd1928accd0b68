#pragma once
// The gateway's messages (transport-internal): parsing one ZeroMQ message
// into an Envelope, the checks a Hello, a Welcome and a Chunk must pass
// before the gateway acts on them, and the envelopes it sends
// (docs/PROTOCOL.md, "Messages", "Handshake", "Payloads, chunks and rounds").
// Pure functions of their arguments: no sockets, no state, no allocation
// beyond the parsed message and the reason text, so tests/fuzz drives them
// with hostile bytes directly. Thread-safe; nothing here throws except
// std::bad_alloc.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/proto/strait.pb.h"

namespace strait::transport {

constexpr size_t kMaxTagBytes = 256;  // longest (round, tag) tag, either direction

// One frame of a multipart message, borrowed from whoever received it.
struct FrameView {
  const void* data = nullptr;
  size_t size = 0;
};

// One message as the gateway reads it: the Envelope (frame 0) and, when a
// second frame followed, that frame (a Chunk's bytes). Frames after the
// second are not part of the protocol and are ignored. `data` borrows from
// the frames passed to parseMessage.
struct Message {
  wire::Envelope envelope;
  bool has_data = false;
  FrameView data;
};

// Parses the frames of one message, routing id excluded: "" and *out filled,
// or why not ("no frames", "not a protocol envelope"); *out is unspecified
// then.
std::string parseMessage(const FrameView* frames, size_t count, Message* out);

// What this site holds an incoming Hello against.
struct HelloTerms {
  std::string job_id;
  std::string self;                         // this site's name
  std::vector<std::string> peers;           // the other sites of the job (this one excluded)
  std::vector<std::string> jurisdictions;   // peers[i]'s jurisdiction in the job config
  std::string config_fingerprint;           // this site's, raw bytes
  bool curve = true;                        // CurveZMQ: the connection's User-Id must be the site
  uint32_t streams = 1;                     // transport.streams: a Hello's stream is below it
};

// The handshake checks of docs/PROTOCOL.md in their order: "" if `h` is
// welcome, else the reason a Welcome{accepted: false} carries. `user` is the
// User-Id ZAP gave the connection (the site whose key it authenticated with;
// nullptr if none), looked at only with terms.curve. The connection's routing
// id plays no part: the ROUTER assigns it, and a Hello welcomed on it binds
// it to the site (docs/PROTOCOL.md, "Connections").
std::string checkHello(const wire::Hello& h, const char* user, const HelloTerms& terms);

// The answer to our Hello from site `peer`: "" if it was accepted, else the
// refusal as this site reports it.
std::string checkWelcome(const wire::Welcome& w, const std::string& peer);

// The shared layout of every payload (chunk_bytes > 0) and this site's cap.
struct ChunkLimits {
  size_t chunk_bytes = 1 << 20;
  size_t max_message_bytes = size_t{1} << 30;
};

// Chunks of a payload of `total` bytes: max(1, ceil(total / chunk_bytes)),
// without overflow.
uint64_t chunkCount(uint64_t total, size_t chunk_bytes);

// The layout checks a chunk passes before anything is allocated for it:
// "" or the reason the Refuse carries. With "", index < count ==
// chunkCount(total_bytes), total_bytes <= max_message_bytes, and the chunk's
// `data_bytes` bytes lie exactly at [index * chunk_bytes, index * chunk_bytes
// + data_bytes) within total_bytes.
std::string checkChunk(const wire::Chunk& c, size_t data_bytes, const ChunkLimits& limits);

// ------------------------------------------------ envelopes we send ---
// One builder per message of docs/PROTOCOL.md's table, so each is spelt once.

// What this site says in its Hello.
struct HelloFields {
  uint32_t protocol_version = 0;
  std::string job_id;
  std::string site;
  std::string jurisdiction;
  std::string config_fingerprint;  // raw bytes
  uint64_t incarnation = 0;
  uint32_t stream = 0;
};
wire::Envelope helloEnvelope(const HelloFields& f);
// accepted iff `refusal` is empty.
wire::Envelope welcomeEnvelope(const std::string& site, uint64_t incarnation, const std::string& refusal);
wire::Envelope heartbeatEnvelope(uint64_t incarnation);

// The header of chunk `index` of `count` of a payload of `total_bytes`; its
// bytes follow in the next frame, `xxh3` their chunkChecksum.
struct ChunkHeader {
  uint64_t round = 0;
  std::string tag;
  uint64_t incarnation = 0;
  uint32_t index = 0;
  uint32_t count = 0;
  uint64_t total_bytes = 0;
  uint64_t xxh3 = 0;
  uint32_t kind = 0;
};
wire::Envelope chunkEnvelope(const ChunkHeader& h);
wire::Envelope ackEnvelope(uint64_t round, const std::string& tag);
wire::Envelope nackEnvelope(uint64_t round, const std::string& tag, uint32_t index);
wire::Envelope refuseEnvelope(uint64_t round, const std::string& tag, const std::string& why);
// `incarnation`: the sender's life the chunk came from (the Closed is void in any other).
wire::Envelope closedEnvelope(uint64_t round, const std::string& tag, uint64_t incarnation);
// `reason` is cut to kMaxReasonBytes.
constexpr size_t kMaxReasonBytes = 512;
wire::Envelope stoppedEnvelope(uint64_t incarnation, const std::string& reason);

}  // namespace strait::transport
