// One message on the gateway's ROUTER from anyone who got past CurveZMQ (or
// from anyone at all, with insecure on loopback): frame 0 the routing id,
// then the Envelope, then a Chunk's bytes. parseMessage must take or refuse
// any frames without crashing; whatever parses must serialise and reparse to
// the same message; and checkChunk may accept a chunk only if its bytes land
// inside the payload it declares, the invariant handleChunk's memcpy relies
// on. Checked against an exact (128-bit) reference of the layout in
// docs/PROTOCOL.md, for several chunk sizes and caps.
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tests/fuzz/gateway_fuzz.h"
#include "transport/checksum.h"
#include "transport/gateway.h"
#include "transport/impl/frame.h"

namespace {

using namespace strait::transport;
__extension__ typedef unsigned __int128 U128;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

void checkLayout(const strait::wire::Chunk& c, const FrameView& data, const ChunkLimits& limits) {
  const std::string bad = checkChunk(c, data.size, limits);
  const U128 total = c.total_bytes();
  const U128 count = total == 0 ? 1 : (total + limits.chunk_bytes - 1) / limits.chunk_bytes;
  const U128 off = U128(c.index()) * limits.chunk_bytes;
  const U128 end = std::min<U128>(total, off + limits.chunk_bytes);
  const bool fits = c.tag().size() <= kMaxTagBytes && total <= limits.max_message_bytes && c.count() == count &&
                    c.index() < c.count() && off < std::max<U128>(total, 1) && data.size == end - off &&
                    c.kind() >= 1 && c.kind() <= 4;
  check(fits == bad.empty());
  check(chunkCount(c.total_bytes(), limits.chunk_bytes) == (total == 0 ? 1 : count));
  if (!bad.empty() || total > (1u << 16)) return;
  // Reassemble it as handleChunk does: ASan sees any write outside.
  std::vector<uint8_t> payload(size_t(c.total_bytes()));
  if (data.size > 0) std::memcpy(payload.data() + uint64_t(c.index()) * limits.chunk_bytes, data.data, data.size);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged, then refused
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<FrameView> frames = fuzz::splitFrames(data, size);
  if (frames.empty()) return 0;
  const std::string routing(static_cast<const char*>(frames[0].data), frames[0].size);
  Message m;
  const std::string why = parseMessage(frames.data() + 1, frames.size() - 1, &m);
  if (frames.size() == 1) {
    check(why == "no frames");
    return 0;
  }
  // The DEALER side reads frame 0 alone: the same envelope, no data.
  Message d;
  check(parseMessage(frames.data() + 1, 1, &d) == why);
  if (!why.empty()) {
    check(why == "not a protocol envelope");
    return 0;
  }
  check(!d.has_data && m.has_data == (frames.size() > 2));
  if (m.has_data) check(m.data.data == frames[2].data && m.data.size == frames[2].size);

  // Round trip: what parsed is what goes out again.
  const std::string bytes = m.envelope.SerializeAsString();
  std::vector<FrameView> again = {{bytes.data(), bytes.size()}};
  if (m.has_data) again.push_back(m.data);
  Message r;
  check(parseMessage(again.data(), again.size(), &r).empty());
  check(google::protobuf::util::MessageDifferencer::Equals(m.envelope, r.envelope));
  check(google::protobuf::util::MessageDifferencer::Equals(d.envelope, r.envelope));
  check(r.envelope.SerializeAsString() == bytes);
  check(r.has_data == m.has_data && r.data.size == m.data.size);

  const strait::wire::Envelope& env = m.envelope;
  switch (env.body_case()) {
    case strait::wire::Envelope::kHello: {
      // ZAP's User-Id is a C string: the routing id up to its first NUL, or none.
      for (const char* user : {routing.c_str(), static_cast<const char*>(nullptr)}) {
        for (bool curve : {true, false}) {
          const HelloTerms terms = fuzz::helloTerms(curve);
          const std::string reason = checkHello(env.hello(), user, terms);
          const strait::wire::Hello& h = env.hello();
          const auto at = std::find(terms.peers.begin(), terms.peers.end(), h.site());
          const bool welcome = h.protocol_version() == kProtocolVersion && h.job_id() == terms.job_id &&
                               at != terms.peers.end() &&
                               h.jurisdiction() == terms.jurisdictions[size_t(at - terms.peers.begin())] &&
                               h.config_fingerprint() == terms.config_fingerprint && h.stream() < terms.streams &&
                               (!curve || (user != nullptr && h.site() == std::string(user)));
          check(welcome == reason.empty());
        }
      }
      break;
    }
    case strait::wire::Envelope::kWelcome:
      check(checkWelcome(env.welcome(), routing).empty() == env.welcome().accepted());
      break;
    case strait::wire::Envelope::kChunk:
      if (!m.has_data) break;  // refused before any layout check
      (void)chunkChecksum(static_cast<const uint8_t*>(m.data.data), m.data.size);
      for (const ChunkLimits& limits : fuzz::kChunkLimits) checkLayout(env.chunk(), m.data, limits);
      break;
    default:
      break;
  }
  return 0;
}
