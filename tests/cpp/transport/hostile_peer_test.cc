// A hostile or broken client talking raw ZeroMQ to a gateway: garbage
// frames, chunks without a handshake, impossible layouts, huge claimed
// sizes, floods of round keys. The gateway must log, refuse, stay up, and
// keep serving the real peer.

#include <gtest/gtest.h>

#include <thread>
#include <zmq.hpp>

#include "tests/cpp/transport/transport_test_util.h"
#include "transport/checksum.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {
namespace {

using namespace testing;

std::string envelope(const wire::Envelope& e) { return e.SerializeAsString(); }

wire::Envelope hello(const std::string& site, uint32_t version = kProtocolVersion) {
  wire::Envelope e;
  auto* h = e.mutable_hello();
  h->set_protocol_version(version);
  h->set_job_id("test-job");
  h->set_site(site);
  h->set_config_fingerprint(std::string("\x01\x02\x03\x04", 4));
  h->set_incarnation(42);
  return e;
}

wire::Envelope chunk(uint64_t round, uint32_t index, uint32_t count, uint64_t total, uint64_t sum = 0) {
  wire::Envelope e;
  auto* c = e.mutable_chunk();
  c->set_round(round);
  c->set_tag("g");
  c->set_incarnation(42);
  c->set_index(index);
  c->set_count(count);
  c->set_total_bytes(total);
  c->set_xxh3(sum);
  c->set_kind(1);
  return e;
}

TEST(HostilePeer, GarbageAndImpossibleChunksAreRefusedAndTheJobGoesOn) {
  // Three sites, plaintext on loopback; s2 is played by a raw socket.
  Job job = makeJob(3, /*insecure=*/true, 4096);
  for (auto& o : job.sites) {
    o.on_site_loss = OnSiteLoss::kContinue;
    o.round_deadline = std::chrono::milliseconds(1500);
    o.max_message_bytes = 1 << 20;
  }
  ::testing::internal::CaptureStderr();
  {
    Gateway a(job.sites[0]), b(job.sites[1]);
    zmq::context_t ctx;
    zmq::socket_t evil(ctx, zmq::socket_type::dealer);
    evil.set(zmq::sockopt::routing_id, "s2");
    evil.set(zmq::sockopt::linger, 0);
    evil.connect(job.sites[0].sites[0].endpoint);
    auto send = [&](const std::string& head, const std::string* data = nullptr) {
      evil.send(zmq::buffer(head), data ? zmq::send_flags::sndmore : zmq::send_flags::none);
      if (data) evil.send(zmq::buffer(*data), zmq::send_flags::none);
    };
    std::string junk = "\xff\xfe not protobuf";
    send(junk);                                           // garbage envelope
    std::string d(10, 'x');
    send(envelope(chunk(0, 0, 1, 10)), &d);               // chunk before any Hello: ignored
    send(envelope(hello("s2", 7)));                       // wrong version: refused
    send(envelope(hello("s9")));                          // not a site of the job: refused
    send(envelope(hello("s2")));                          // a valid handshake
    send(envelope(chunk(0, 0, 1, uint64_t(1) << 40)), &d);  // claims 1 TiB: refused, nothing allocated
    send(envelope(chunk(0, 5, 3, 10)), &d);               // index beyond count
    send(envelope(chunk(0, 0, 1, 10, 12345)), &d);        // wrong checksum: Nack
    send(envelope(chunk(0, 0, 1, 11)), &d);               // data frame of the wrong length
    send(envelope(chunk(0, 0, 1, 10)));                   // chunk without its data frame
    wire::Envelope odd = chunk(0, 0, 1, 10, chunkChecksum(d.data(), d.size()));
    odd.mutable_chunk()->set_kind(9);
    send(envelope(odd), &d);                              // a kind the audit log could not name
    const std::string first_half(4096, 'y');
    for (uint64_t r = 100; r < 200; ++r) {  // key flood: valid first chunks of 100 rounds
      send(envelope(chunk(r, 0, 2, 8000, chunkChecksum(first_half.data(), first_half.size()))), &first_half);
    }
    // The real sites exchange meanwhile; s2 never delivers a valid payload.
    auto fa = a.exchange(0, "g", payloadFor(0, 0, 20000));
    auto fb = b.exchange(0, "g", payloadFor(1, 0, 20000));
    RoundResult ra = getWithin(fa), rb = getWithin(fb);
    EXPECT_EQ(*ra.payloads[1], payloadFor(1, 0, 20000));
    EXPECT_EQ(*rb.payloads[0], payloadFor(0, 0, 20000));
    EXPECT_EQ(ra.missing, std::vector<std::string>{"s2"});
    // And again: the gateway is still healthy after all that.
    auto fa2 = a.exchange(1, "g", payloadFor(0, 1, 5000));
    auto fb2 = b.exchange(1, "g", payloadFor(1, 1, 5000));
    EXPECT_EQ(*getWithin(fa2).payloads[1], payloadFor(1, 1, 5000));
    getWithin(fb2);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  for (const char* expect : {"malformed message from connection 's2'",
                             "refused handshake from 's2': protocol version 7",
                             "refused handshake from 's9': site 's9' is not a site of job",
                             "exceeds max_message_bytes", "does not fit a payload of 10 bytes",
                             "failed its checksum", "has 10 bytes, expected 11", "message kind 9 is not one of",
                             "too many rounds opened ahead of this site"}) {
    EXPECT_NE(log.find(expect), std::string::npos) << "log lacks \"" << expect << "\":\n" << log.substr(0, 4000);
  }
}

}  // namespace
}  // namespace strait::transport
