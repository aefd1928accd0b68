// A hostile or broken client talking raw ZeroMQ to a gateway: garbage
// frames, chunks without a handshake, impossible layouts, huge claimed
// sizes, floods of round keys. The gateway must log, refuse, stay up, and
// keep serving the real peer.

#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <thread>
#include <zmq.hpp>

#include "tests/cpp/transport/transport_test_util.h"
#include "transport/checksum.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {
namespace {

using namespace testing;

std::string envelope(const wire::Envelope& e) { return e.SerializeAsString(); }

// makeJob's jurisdictions: s0 CN, s1 SG, s2 DE.
wire::Envelope hello(const std::string& site, uint32_t version = kProtocolVersion) {
  wire::Envelope e;
  auto* h = e.mutable_hello();
  h->set_protocol_version(version);
  h->set_job_id("test-job");
  h->set_site(site);
  h->set_jurisdiction(site == "s0" ? "CN" : site == "s1" ? "SG" : "DE");
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
    send(envelope(hello("s0")));                          // the receiving site itself: refused, named
    wire::Envelope elsewhere = hello("s2");
    elsewhere.mutable_hello()->set_jurisdiction("US");
    send(envelope(elsewhere));                            // another jurisdiction than the config's: refused
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
                             "refused handshake from 's0': site 's0' is this site",
                             "site 's2' says its jurisdiction is 'US', the job config says 'DE'",
                             "exceeds max_message_bytes", "does not fit a payload of 10 bytes",
                             "failed its checksum", "has 10 bytes, expected 11", "message kind 9 is not one of",
                             "too many rounds opened ahead of this site"}) {
    EXPECT_NE(log.find(expect), std::string::npos) << "log lacks \"" << expect << "\":\n" << log.substr(0, 4000);
  }
}

size_t residentBytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  unsigned long pages = 0, resident = 0;
  if (f != nullptr) {
    if (std::fscanf(f, "%lu %lu", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return size_t(resident) * size_t(::sysconf(_SC_PAGESIZE));
}

// An admitted peer opens rounds ahead of this site with one chunk each that
// claims a payload of 512 MiB. Memory must follow the bytes that arrived
// (a chunk each), not the sizes claimed: before, the gateway allocated (and
// zeroed) every claimed payload at its first chunk, 3 GiB here.
TEST(HostilePeer, MemoryFollowsBytesReceivedNotBytesClaimed) {
  Job job = makeJob(2, /*insecure=*/true);
  job.sites[0].max_message_bytes = uint64_t(1) << 30;
  const uint64_t claim = uint64_t(512) << 20;
  const size_t chunk_bytes = job.sites[0].chunk_bytes;
  const uint32_t count = uint32_t(claim / chunk_bytes);
  const int rounds = 2 * job.sites[0].max_rounds_in_flight - 2;  // within the keys-ahead limit
  ::testing::internal::CaptureStderr();
  {
    Gateway a(job.sites[0]);
    zmq::context_t ctx;
    zmq::socket_t evil(ctx, zmq::socket_type::dealer);
    evil.set(zmq::sockopt::linger, 0);
    evil.set(zmq::sockopt::routing_id, "s1");  // what the first protocol version required
    evil.connect(job.sites[0].sites[0].endpoint);
    evil.send(zmq::buffer(envelope(hello("s1"))), zmq::send_flags::none);
    const size_t before = residentBytes();
    const std::string piece(chunk_bytes, 'm');
    for (int r = 0; r < rounds; ++r) {
      wire::Envelope e = chunk(100 + r, 0, count, claim, chunkChecksum(piece.data(), piece.size()));
      const std::string head = envelope(e);
      evil.send(zmq::buffer(head), zmq::send_flags::sndmore);
      evil.send(zmq::buffer(piece), zmq::send_flags::none);
    }
    // The gateway lists every round the peer opened once it took the chunk.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (a.peerRounds("g").size() < size_t(rounds) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_EQ(a.peerRounds("g").size(), size_t(rounds)) << "the gateway did not take the chunks";
    const size_t grown = residentBytes() > before ? residentBytes() - before : 0;
    EXPECT_LT(grown, size_t(64) << 20) << rounds << " rounds claiming " << claim << " bytes, one chunk each, grew "
                                       << grown << " bytes";
  }
  ::testing::internal::GetCapturedStderr();
}

// Connections under an admitted site's identity: clients holding real keys
// of the job (s1's, s2's) connect to s0 naming routing ids of existing sites
// (the old scheme's ROUTER handover took the slot over; in libzmq 4.3.4 a
// late or garbage frame on such a connection could abort the process),
// claim the other's name in a Hello, send garbage and chunks without a
// Hello, and hang up, again and again, while the three real gateways train.
// Every round must complete with the right payloads, and s0 must live.
TEST(HostilePeer, ConnectionsUnderAnAdmittedSitesIdentityCannotStopOrMisleadTheGateway) {
  Job job = makeJob(3, /*insecure=*/false);
  ::testing::internal::CaptureStderr();
  {
    std::vector<std::unique_ptr<Gateway>> g;
    for (const GatewayOptions& o : job.sites) g.push_back(std::make_unique<Gateway>(o));
    zmq::context_t ctx;
    auto client = [&](size_t key_of, const std::string& routing) {
      auto s = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
      s->set(zmq::sockopt::linger, 0);
      s->set(zmq::sockopt::routing_id, routing);
      s->set(zmq::sockopt::curve_serverkey, job.keys[0].public_key);
      s->set(zmq::sockopt::curve_publickey, job.keys[key_of].public_key);
      s->set(zmq::sockopt::curve_secretkey, job.keys[key_of].secret_key);
      s->connect(job.sites[0].sites[0].endpoint);
      return s;
    };
    const std::string junk = "\x01\x02 not an envelope";
    const std::string bytes(100, 'z');
    for (uint64_t r = 0; r < 6; ++r) {
      // Round 0 names the sites' own ids; later rounds ids of their own, as
      // the ROUTER may not yet have dropped the previous round's connections
      // (and, without handover, refuses a new one under an id still in use).
      const std::string id1 = r == 0 ? "s1" : "s1/" + std::to_string(r);
      const std::string id2 = r == 0 ? "s2" : "s2/" + std::to_string(r);
      std::vector<std::unique_ptr<zmq::socket_t>> evil;
      evil.push_back(client(1, id1));  // s1's own key under s1's (old-scheme) routing id, twice
      evil.push_back(client(1, id1));
      evil.push_back(client(2, id1));  // s2's key under s1's id
      evil.push_back(client(2, id2));
      for (auto& e : evil) {
        e->send(zmq::buffer(junk), zmq::send_flags::dontwait);
        const std::string c = envelope(chunk(r, 0, 1, bytes.size(), chunkChecksum(bytes.data(), bytes.size())));
        e->send(zmq::buffer(c), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
        e->send(zmq::buffer(bytes), zmq::send_flags::dontwait);
      }
      // Each then claims the other site's name and waits for the refusal:
      // by then the gateway has taken every frame before it. Of the three
      // connections naming routing id "s1", ZeroMQ keeps the first and
      // refuses the others (no handover), so one answer comes per id.
      for (size_t k = 0; k < evil.size(); ++k) {
        evil[k]->send(zmq::buffer(envelope(hello(k < 2 ? "s2" : "s1"))), zmq::send_flags::none);
      }
      std::vector<bool> answered(evil.size(), false);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      auto answers = [&] { return std::count(answered.begin(), answered.end(), true); };
      while (answers() < 2 && std::chrono::steady_clock::now() < until) {
        std::vector<zmq::pollitem_t> items;
        for (auto& e : evil) items.push_back({e->handle(), 0, ZMQ_POLLIN, 0});
        zmq::poll(items.data(), items.size(), std::chrono::milliseconds(100));
        for (size_t k = 0; k < evil.size(); ++k) {
          zmq::message_t answer;
          if (!(items[k].revents & ZMQ_POLLIN) || !evil[k]->recv(answer, zmq::recv_flags::dontwait)) continue;
          wire::Envelope w;
          ASSERT_TRUE(w.ParseFromArray(answer.data(), int(answer.size())));
          EXPECT_FALSE(w.welcome().accepted()) << "connection " << k << " was welcomed under another site's name";
          answered[k] = true;
        }
      }
      ASSERT_EQ(answers(), 2) << "one answer per routing id (s1, s2)";
      EXPECT_TRUE(answered[3]) << "the only connection naming s2";
      std::vector<std::future<RoundResult>> f;
      for (size_t i = 0; i < 3; ++i) f.push_back(g[i]->exchange(r, "g", payloadFor(i, r, 3000 + 100 * i)));
      for (size_t i = 0; i < 3; ++i) {
        const RoundResult res = getWithin(f[i]);
        EXPECT_TRUE(res.missing.empty()) << "round " << r << " at s" << i;
        for (size_t j = 0; j < 3; ++j) {
          ASSERT_TRUE(res.payloads[j]) << "round " << r << " at s" << i << " from s" << j;
          EXPECT_EQ(*res.payloads[j], payloadFor(j, r, 3000 + 100 * j)) << "round " << r << " at s" << i;
        }
      }
      // A late frame after the round, then the connections go away.
      for (auto& e : evil) e->send(zmq::buffer(junk), zmq::send_flags::dontwait);
    }
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("site 's1' connected with the key of 's2'"), std::string::npos) << log.substr(0, 4000);
}

}  // namespace
}  // namespace strait::transport
