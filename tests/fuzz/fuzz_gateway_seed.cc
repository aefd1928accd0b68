// Writes the seed corpora of fuzz_frame and fuzz_handshake under argv[1]
// (tests/fuzz/corpus): valid envelopes of every kind, for this site "s0" of
// the fuzz job (gateway_fuzz.h), and one of each handshake refusal.
//   frame/NAME      frames: routing id, envelope[, data]
//   handshake/NAME  one serialised Envelope
#include <cstdio>
#include <string>
#include <vector>

#include "tests/fuzz/gateway_fuzz.h"
#include "transport/checksum.h"
#include "transport/gateway.h"

namespace {

using namespace strait::transport;
using strait::wire::Envelope;

bool write(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  return std::fclose(f) == 0 && ok;
}

Envelope hello(const std::string& site) {
  const HelloTerms t = fuzz::helloTerms(true);
  Envelope e;
  e.mutable_hello()->set_protocol_version(kProtocolVersion);
  e.mutable_hello()->set_job_id(t.job_id);
  e.mutable_hello()->set_site(site);
  e.mutable_hello()->set_jurisdiction("SG");
  e.mutable_hello()->set_config_fingerprint(t.config_fingerprint);
  e.mutable_hello()->set_incarnation(0x1234567890abcdefull);
  return e;
}

Envelope welcome(bool accepted) {
  Envelope e;
  e.mutable_welcome()->set_accepted(accepted);
  if (!accepted) e.mutable_welcome()->set_reason("job id 'other' differs from this site's job 'fuzz-job'");
  e.mutable_welcome()->set_site("s1");
  e.mutable_welcome()->set_incarnation(42);
  return e;
}

// Chunk `index` of a payload of `total` bytes in chunks of `chunk` bytes.
std::vector<std::string> chunk(uint64_t total, size_t chunk, uint32_t index, uint32_t kind = 1) {
  const std::string payload(total, 'p');
  const uint64_t off = uint64_t(index) * chunk;
  const std::string data = payload.substr(off, chunk);
  Envelope e;
  strait::wire::Chunk* c = e.mutable_chunk();
  c->set_round(3);
  c->set_tag("ddp.b0");
  c->set_incarnation(0x1234567890abcdefull);
  c->set_index(index);
  c->set_count(uint32_t(chunkCount(total, chunk)));
  c->set_total_bytes(total);
  c->set_xxh3(chunkChecksum(data.data(), data.size()));
  c->set_kind(kind);
  return {"s2", e.SerializeAsString(), data};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_gateway_seed CORPUS_DIR (tests/fuzz/corpus)\n");
    return 2;
  }
  const std::string frame = std::string(argv[1]) + "/frame/";
  const std::string handshake = std::string(argv[1]) + "/handshake/";
  bool ok = true;

  Envelope e;
  ok &= write(handshake + "hello", hello("s2").SerializeAsString());
  e = hello("s2");
  e.mutable_hello()->set_protocol_version(kProtocolVersion + 1);
  ok &= write(handshake + "hello-version", e.SerializeAsString());
  e = hello("s2");
  e.mutable_hello()->set_job_id("other");
  ok &= write(handshake + "hello-job", e.SerializeAsString());
  ok &= write(handshake + "hello-site", hello("s9").SerializeAsString());
  ok &= write(handshake + "hello-self", hello("s0").SerializeAsString());
  e = hello("s2");
  e.mutable_hello()->set_config_fingerprint(std::string(32, '\x01'));
  ok &= write(handshake + "hello-fingerprint", e.SerializeAsString());
  ok &= write(handshake + "welcome", welcome(true).SerializeAsString());
  ok &= write(handshake + "welcome-refused", welcome(false).SerializeAsString());

  ok &= write(frame + "hello", fuzz::joinFrames({"s2", hello("s2").SerializeAsString()}));
  ok &= write(frame + "hello-routing", fuzz::joinFrames({"s1", hello("s2").SerializeAsString()}));
  ok &= write(frame + "welcome", fuzz::joinFrames({"s1", welcome(true).SerializeAsString()}));
  e.Clear();
  e.mutable_heartbeat()->set_incarnation(0x1234567890abcdefull);
  ok &= write(frame + "heartbeat", fuzz::joinFrames({"s2", e.SerializeAsString()}));
  // Chunks that fit the small layout (7-byte chunks) and the default one.
  ok &= write(frame + "chunk-0-of-2", fuzz::joinFrames(chunk(10, 7, 0)));
  ok &= write(frame + "chunk-1-of-2", fuzz::joinFrames(chunk(10, 7, 1, 4)));
  ok &= write(frame + "chunk-empty", fuzz::joinFrames(chunk(0, 7, 0)));
  ok &= write(frame + "chunk-of-bytes", fuzz::joinFrames(chunk(3, 1, 1)));
  ok &= write(frame + "chunk-whole", fuzz::joinFrames(chunk(300, size_t{1} << 20, 0, 2)));
  std::vector<std::string> bare = chunk(10, 7, 0);
  bare.pop_back();
  ok &= write(frame + "chunk-no-data", fuzz::joinFrames(bare));
  e.Clear();
  e.mutable_ack()->set_round(3);
  e.mutable_ack()->set_tag("ddp.b0");
  ok &= write(frame + "ack", fuzz::joinFrames({"s1", e.SerializeAsString()}));
  e.Clear();
  e.mutable_nack()->set_round(3);
  e.mutable_nack()->set_tag("ddp.b0");
  e.mutable_nack()->set_index(1);
  ok &= write(frame + "nack", fuzz::joinFrames({"s1", e.SerializeAsString()}));
  e.Clear();
  e.mutable_refuse()->set_round(3);
  e.mutable_refuse()->set_tag("ddp.b0");
  e.mutable_refuse()->set_reason("payload of 2000 bytes exceeds max_message_bytes = 1000");
  ok &= write(frame + "refuse", fuzz::joinFrames({"s1", e.SerializeAsString()}));
  if (!ok) {
    std::perror("fuzz_gateway_seed");
    return 1;
  }
  return 0;
}
