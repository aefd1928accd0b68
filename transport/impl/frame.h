#pragma once
// The gateway's incoming frames (transport-internal): parsing one ZeroMQ
// message into an Envelope and the checks a Hello, a Welcome and a Chunk must
// pass before the gateway acts on them (docs/PROTOCOL.md, "Messages",
// "Handshake", "Payloads, chunks and rounds"). Pure functions of their
// arguments: no sockets, no state, no allocation beyond the parsed message and
// the reason text, so tests/fuzz drives them with hostile bytes directly.
// Thread-safe; nothing here throws except std::bad_alloc.

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

}  // namespace strait::transport
