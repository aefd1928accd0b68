// Gateways in one process (each with its own I/O thread and real ZeroMQ
// sockets on loopback): all-gather, chunking, CurveZMQ admission, handshake
// refusals, corruption, limits, missing and slow sites. Every wait has a
// deadline.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include <fstream>
#include <memory>
#include <thread>

#include "tests/cpp/transport/transport_test_util.h"
#include "transport/impl/frame.h"

namespace strait::transport {
namespace {

using namespace testing;
using std::chrono::milliseconds;

std::vector<std::unique_ptr<Gateway>> start(const Job& job) {
  std::vector<std::unique_ptr<Gateway>> g;
  for (const GatewayOptions& o : job.sites) g.push_back(std::make_unique<Gateway>(o));
  return g;
}

// Every site exchanges `rounds` rounds; checks every payload of every site.
void exchangeAndCheck(std::vector<std::unique_ptr<Gateway>>& g, uint64_t rounds,
                      const std::vector<size_t>& sizes) {
  for (uint64_t r = 0; r < rounds; ++r) {
    const size_t bytes = sizes[r % sizes.size()];
    std::vector<std::future<RoundResult>> futures;
    for (size_t s = 0; s < g.size(); ++s) futures.push_back(g[s]->exchange(r, "grad", payloadFor(s, r, bytes)));
    for (size_t s = 0; s < g.size(); ++s) {
      RoundResult res = getWithin(futures[s]);
      ASSERT_EQ(res.round, r);
      ASSERT_EQ(res.tag, "grad");
      ASSERT_TRUE(res.missing.empty());
      ASSERT_EQ(res.payloads.size(), g.size());
      for (size_t from = 0; from < g.size(); ++from) {
        ASSERT_TRUE(res.payloads[from].has_value());
        ASSERT_EQ(*res.payloads[from], payloadFor(from, r, bytes)) << "site " << s << " from " << from << " round " << r;
      }
      ASSERT_EQ(res.peers.size(), g.size() - 1);
    }
  }
}

class Sites : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(Sites, AllGatherInSiteOrderAcrossChunkBoundaries) {
  const auto [n, insecure] = GetParam();
  Job job = makeJob(size_t(n), insecure, 64 * 1024);
  auto g = start(job);
  // 0 bytes, 1 byte, one chunk exactly, just over, several chunks.
  exchangeAndCheck(g, 6, {0, 1, 64 * 1024, 64 * 1024 + 1, 300000, 17});
}

INSTANTIATE_TEST_SUITE_P(Gateways, Sites,
                         ::testing::Combine(::testing::Values(2, 3, 4), ::testing::Values(false, true)),
                         [](const ::testing::TestParamInfo<std::tuple<int, bool>>& p) {
                           return std::to_string(std::get<0>(p.param)) + "sites_" +
                                  (std::get<1>(p.param) ? "plaintext" : "curve");
                         });

TEST(Gateway, SeveralRoundsInFlightAtOnce) {
  Job job = makeJob(3);
  for (auto& o : job.sites) o.max_rounds_in_flight = 4;
  auto g = start(job);
  std::vector<std::vector<std::future<RoundResult>>> f(3);
  for (uint64_t r = 0; r < 4; ++r) {
    for (size_t s = 0; s < 3; ++s) f[s].push_back(g[s]->exchange(r, "t", payloadFor(s, r, 100000)));
  }
  for (size_t s = 0; s < 3; ++s) {
    for (uint64_t r = 0; r < 4; ++r) {
      RoundResult res = getWithin(f[s][r]);
      for (size_t from = 0; from < 3; ++from) ASSERT_EQ(*res.payloads[from], payloadFor(from, r, 100000));
    }
  }
}

TEST(Gateway, TagsSeparateConcurrentExchangesOfOneRound) {
  Job job = makeJob(2);
  auto g = start(job);
  auto a1 = g[0]->exchange(7, "a", {1, 2, 3});
  auto b1 = g[0]->exchange(7, "b", {4});
  auto b2 = g[1]->exchange(7, "b", {5});
  auto a2 = g[1]->exchange(7, "a", {6, 7});
  EXPECT_EQ(*getWithin(a1).payloads[1], (std::vector<uint8_t>{6, 7}));
  EXPECT_EQ(*getWithin(b1).payloads[1], (std::vector<uint8_t>{5}));
  EXPECT_EQ(*getWithin(a2).payloads[0], (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_EQ(*getWithin(b2).payloads[0], (std::vector<uint8_t>{4}));
}

// True once `pred` holds, polled for up to 20 s.
template <typename Pred>
bool eventually(Pred pred) {
  for (int i = 0; i < 1000; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return pred();
}

bool hears(const Gateway& g, const std::string& site) {
  const auto live = g.livePeers();
  return std::find(live.begin(), live.end(), site) != live.end();
}

// A running site whose every slot holds a round waiting for a restarted
// site must still answer that site's join request: join messages take no
// slot, and an ordinary exchange still waits for one.
TEST(Gateway, JoinMessagesNeedNoSlotWhileEveryRoundWaits) {
  Job job = makeJob(2);
  for (auto& o : job.sites) o.max_rounds_in_flight = 1;
  auto g = start(job);
  auto held = g[0]->exchange(0, "ddp.b0", {1});  // site 1 never sends round 0: the one slot stays held
  EXPECT_FALSE(g[0]->waitForSlot(milliseconds(0)));
  auto request = g[1]->exchange(77, "strait.join", {9});
  auto answer = g[0]->exchange(77, "strait.join", {8});  // would wait the hard deadline if it needed the slot
  EXPECT_EQ(*getWithin(answer).payloads[1], (std::vector<uint8_t>{9}));
  EXPECT_EQ(*getWithin(request).payloads[0], (std::vector<uint8_t>{8}));
  EXPECT_FALSE(g[0]->waitForSlot(milliseconds(0))) << "a join message freed a slot it never took";
  auto other = g[1]->exchange(0, "ddp.b0", {2});
  EXPECT_EQ(*getWithin(held).payloads[1], (std::vector<uint8_t>{2}));
  getWithin(other);
  EXPECT_TRUE(g[0]->waitForSlot(milliseconds(20000)));
}

TEST(Gateway, CorruptedChunkIsDetectedAndRetransmitted) {
  Job job = makeJob(2);
  job.sites[0].test_corrupt_chunk = 2;  // every payload's chunk 2, first send
  ::testing::internal::CaptureStderr();
  {
    auto g = start(job);
    auto f0 = g[0]->exchange(0, "g", payloadFor(0, 0, 500000));
    auto f1 = g[1]->exchange(0, "g", payloadFor(1, 0, 500000));
    RoundResult r1 = getWithin(f1);
    EXPECT_EQ(*r1.payloads[0], payloadFor(0, 0, 500000)) << "the corrupt chunk was never accepted";
    // s0's own round completes on receipt of s1's payload, maybe before the
    // chunk asked for again left: its count is the round table's test
    // (RoundTable.ACorruptedChunkIsAskedForAgainAndCounted).
    getWithin(f0);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("failed its checksum"), std::string::npos) << log;
}

// Parallel streams: a connection that breaks mid-payload loses what was
// queued on it (ZeroMQ does not resend); the other streams carry those
// chunks again. The payload is above kCompleteOnReceiptMaxBytes, so s0's
// round completes only once s1 acknowledged the whole of it, with the
// chunks that went again counted.
TEST(Gateway, AStreamCutMidPayloadIsSurvivedByTheOthers) {
  Job job = makeJob(2);
  const size_t bytes = size_t(80) << 20;  // 1280 chunks of 64 KiB
  for (GatewayOptions& o : job.sites) {
    o.streams = 4;
    o.max_message_bytes = bytes;
  }
  job.sites[0].test_cut_stream = 800;  // ~200 chunks have gone on stream 1 by then, ~800 on all
  ::testing::internal::CaptureStderr();
  {
    auto g = start(job);
    auto f0 = g[0]->exchange(0, "g", payloadFor(0, 0, bytes));
    auto f1 = g[1]->exchange(0, "g", payloadFor(1, 0, 1000));
    RoundResult r1 = getWithin(f1);
    EXPECT_TRUE(*r1.payloads[0] == payloadFor(0, 0, bytes)) << "s0's payload arrived incomplete or changed";
    RoundResult r0 = getWithin(f0);
    EXPECT_GT(r0.peers[0].retransmissions, 0u) << "the chunks queued on the cut stream went again";
    EXPECT_LT(r0.peers[0].retransmissions, 600u) << "only those of the cut stream go again, not all sent so far";
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("cutting the connection of stream 1"), std::string::npos) << log;

}

TEST(Gateway, AHelloOnAStreamBeyondTheJobsStreamsIsRefused) {
  HelloTerms terms;
  terms.job_id = "j";
  terms.self = "a";
  terms.peers = {"b"};
  terms.curve = false;
  terms.streams = 4;
  wire::Hello h;
  h.set_protocol_version(kProtocolVersion);
  h.set_job_id("j");
  h.set_site("b");
  h.set_stream(3);
  EXPECT_EQ(checkHello(h, nullptr, terms), "");
  h.set_stream(4);
  EXPECT_EQ(checkHello(h, nullptr, terms), "stream 4 is beyond this job's transport.streams = 4");
}

// Runs a job whose site s1 is refused: returns the error s1's exchange()
// raised (or "(accepted)") and everything the gateways logged.
std::pair<std::string, std::string> refusalAndLog(Job job) {
  ::testing::internal::CaptureStderr();
  std::string error;
  {
    auto g = start(job);
    auto f = g[1]->exchange(0, "g", {1});
    try {
      getWithin(f, std::chrono::seconds(20));
      error = "(accepted)";
    } catch (const ProtocolError& e) {
      error = e.what();
    }
  }
  return {error, ::testing::internal::GetCapturedStderr()};
}

std::string refusal(Job job) { return refusalAndLog(std::move(job)).first; }

TEST(Gateway, UnknownKeyIsRefusedAndLogged) {
  Job job = makeJob(2);
  // s1 presents a key s0 does not know (s1's own config is self-consistent).
  const KeyPair intruder = generateKeyPair();
  job.sites[1].secret_key = intruder.secret_key;
  job.sites[1].sites[1].public_key = intruder.public_key;
  const auto [error, log] = refusalAndLog(job);
  EXPECT_NE(error.find("refused our CurveZMQ key"), std::string::npos) << error;
  EXPECT_NE(log.find("public key " + intruder.public_key + " is not one of this job's sites"), std::string::npos)
      << log;
  EXPECT_NE(log.find("refused a connection from 127.0.0.1"), std::string::npos) << log;
}

// The refusing side does not wait for a site it refused: its round fails at
// once (on_site_loss: wait) naming the refusal, instead of waiting out the
// hard deadline for a site that "never connected" (issue 17: a site whose
// peer failed at start-up was not told).
TEST(Gateway, TheRefusingSideStopsWaitingForTheSiteItRefused) {
  Job job = makeJob(2);
  job.sites[1].sites[1].jurisdiction = "XX";  // s1 says so of itself; s0 welcomes nothing of that
  for (auto& o : job.sites) o.hard_deadline = milliseconds(120000);
  ::testing::internal::CaptureStderr();
  auto g = start(job);
  auto f = g[0]->exchange(0, "g", {1});
  const auto t0 = std::chrono::steady_clock::now();
  try {
    getWithin(f, std::chrono::seconds(60));
    FAIL() << "the round completed without its refused peer";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("site 's1' was refused in the handshake here: site 's1' says its "
                                         "jurisdiction is 'XX', the job config says 'SG'"),
              std::string::npos)
        << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(60));
  g.clear();
  ::testing::internal::GetCapturedStderr();
}

// A site whose endpoint fails the CurveZMQ handshake (it runs with a secret
// key that is not the one of the public key the config lists) is named as
// such at once by whoever waits for it, not as "never connected" after the
// round deadline (issue 17: a site whose peer failed at start-up was not told).
TEST(Gateway, AWaitedSiteWhoseEndpointFailsTheCurveHandshakeIsNamedAtOnce) {
  Job job = makeJob(2);
  for (auto& o : job.sites) {
    o.round_deadline = milliseconds(60000);
    o.hard_deadline = milliseconds(60000);
  }
  job.sites[1].secret_key = generateKeyPair().secret_key;
  ::testing::internal::CaptureStderr();
  std::string log;
  {
    auto g = start(job);
    auto f = g[0]->exchange(0, "g", {1});
    std::this_thread::sleep_for(milliseconds(3000));
    EXPECT_EQ(f.wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  }
  log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("round 0 'g': waiting for s1 (s1: never connected: its endpoint closes every connection before "
                     "the CurveZMQ handshake passes"),
            std::string::npos)
      << log;
}

// A gateway that stops says why: under continue its peers go on without it
// at once; under wait they say at once why they wait (it may restart) and
// name the reason when the hard deadline fails the round.
TEST(Gateway, APeerThatStopsSaysWhy) {
  for (const bool go_on : {false, true}) {
    Job job = makeJob(2);
    for (auto& o : job.sites) {
      o.hard_deadline = milliseconds(go_on ? 120000 : 3000);
      o.round_deadline = milliseconds(go_on ? 60000 : 2000);
      o.on_site_loss = go_on ? OnSiteLoss::kContinue : OnSiteLoss::kWait;
    }
    ::testing::internal::CaptureStderr();
    auto g = start(job);
    exchangeAndCheck(g, 1, {10});
    auto f = g[0]->exchange(1, "grad", {1});
    g[1]->stop("finished its 30 steps");
    if (go_on) {
      const RoundResult r = getWithin(f, std::chrono::seconds(60));
      EXPECT_EQ(r.missing, std::vector<std::string>{"s1"});
    } else {
      try {
        getWithin(f, std::chrono::seconds(60));
        FAIL() << "the round completed without the peer that stopped";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("round 1 'grad': no payload from s1 within the hard deadline of 3.0 s "
                                             "(s1: stopped: finished its 30 steps)"),
                  std::string::npos)
            << e.what();
      }
    }
    g.clear();
    const std::string log = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(log.find("site 's1' stopped: finished its 30 steps"), std::string::npos) << log;
  }
}

TEST(Gateway, WrongJobIdIsRefusedSayingWhich) {
  Job job = makeJob(2);
  job.sites[1].job_id = "other-job";
  EXPECT_NE(refusal(job).find("job id 'other-job' differs from this site's job 'test-job'"), std::string::npos);
}

TEST(Gateway, WrongProtocolVersionIsRefused) {
  Job job = makeJob(2);
  job.sites[1].test_protocol_version = 1;
  EXPECT_NE(refusal(job).find("protocol version 1 is not supported (this gateway speaks 3)"), std::string::npos);
}

TEST(Gateway, DifferentConfigIsRefused) {
  Job job = makeJob(2);
  job.sites[1].config_fingerprint = {9, 9, 9, 9};
  EXPECT_NE(refusal(job).find("config fingerprint 09090909... differs"), std::string::npos);
}

TEST(Gateway, OversizedPayloadsAreRefusedAtBothEnds) {
  Job job = makeJob(2);
  job.sites[0].max_message_bytes = 1000;
  auto g = start(job);
  EXPECT_THROW(g[0]->exchange(0, "g", std::vector<uint8_t>(1001)), InvalidArgument);
  // s1 allows more than s0 accepts: s0 refuses before allocating, s1 learns
  // why (before s0 opens the round: rounds complete on receipt, so s0's
  // payload arriving first would complete s1's round, and the refusal would
  // then be a parting, Gateway.WithContinueARefusalAfter...).
  auto f1 = g[1]->exchange(0, "g", std::vector<uint8_t>(5000));
  try {
    getWithin(f1);
    FAIL() << "accepted";
  } catch (const ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds max_message_bytes = 1000"), std::string::npos) << e.what();
  }
  auto f0 = g[0]->exchange(0, "g", std::vector<uint8_t>(10));
  EXPECT_THROW(getWithin(f0), ProtocolError);
}

// Rounds complete on receipt: s1 holds s0's payload when it opens the round
// and completes at once (before its own payload, which s0 refuses, has
// left). Under continue s0 goes on without s1's payload, s1 went on with
// s0's: the two parted, and both learn it (RoundTable.ARefusalAfter...).
TEST(Gateway, WithContinueARefusalAfterTheSenderCompletedTheRoundIsAPartingOnBothSides) {
  Job job = makeJob(2);
  job.sites[0].max_message_bytes = 1000;
  for (auto& o : job.sites) {
    o.on_site_loss = OnSiteLoss::kContinue;
    o.round_deadline = milliseconds(20000);  // far beyond the test's wait
  }
  auto g = start(job);
  ::testing::internal::CaptureStderr();
  auto f0 = g[0]->exchange(0, "g", std::vector<uint8_t>(10));
  ASSERT_TRUE(eventually([&] { return !g[1]->peerRounds("g").empty(); }));
  auto f1 = g[1]->exchange(0, "g", std::vector<uint8_t>(5000));  // s0 refuses it
  RoundResult r1 = getWithin(f1), r0 = getWithin(f0);
  EXPECT_TRUE(r1.missing.empty());                        // s1 completed with s0's payload
  EXPECT_EQ(r0.missing, std::vector<std::string>{"s1"});  // s0 without s1's
  std::vector<std::string> d0, d1;
  ASSERT_TRUE(eventually([&] {
    for (const auto& s : g[0]->takeDivergedPeers()) d0.push_back(s);
    for (const auto& s : g[1]->takeDivergedPeers()) d1.push_back(s);
    return !d0.empty() && !d1.empty();
  }));
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(d0, std::vector<std::string>{"s1"});
  EXPECT_EQ(d1, std::vector<std::string>{"s0"});
  EXPECT_NE(log.find("site 's0' refused our payload: payload of 5000 bytes exceeds max_message_bytes = 1000"),
            std::string::npos)
      << log;
}

TEST(Gateway, RepeatedRoundAndTagIsRefused) {
  Job job = makeJob(2);
  auto g = start(job);
  auto f = g[0]->exchange(1, "g", {1});
  EXPECT_THROW(g[0]->exchange(1, "g", {1}), InvalidArgument);
  auto f1 = g[1]->exchange(1, "g", {2});
  getWithin(f);
  getWithin(f1);
}

TEST(Gateway, InsecureOnlyOnLoopback) {
  Job job = makeJob(2, true);
  job.sites[0].sites[1].endpoint = "tcp://10.1.2.3:7000";
  try {
    Gateway g(job.sites[0]);
    FAIL() << "accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("only on loopback"), std::string::npos) << e.what();
  }
}

TEST(Gateway, InsecureBindOnlyOnLoopback) {
  Job job = makeJob(2, true);
  job.sites[0].sites[0].bind = "tcp://0.0.0.0:7000";
  EXPECT_THROW(Gateway g(job.sites[0]), InvalidArgument);
}

// `bind` is where the gateway listens; `endpoint` is only what peers dial
// (behind NAT or a proxy the two differ).
TEST(Gateway, ListensOnBindNotOnEndpoint) {
  Job job = makeJob(2, true);
  const int bind_port = freePort();
  job.sites[0].sites[0].bind = "tcp://127.0.0.1:" + std::to_string(bind_port);
  const int endpoint_port = std::stoi(job.sites[0].sites[0].endpoint.substr(job.sites[0].sites[0].endpoint.rfind(':') + 1));
  Gateway g(job.sites[0]);
  auto connects = [](int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
  };
  EXPECT_TRUE(connects(bind_port));
  EXPECT_FALSE(connects(endpoint_port));
}

TEST(Gateway, MissingKeysAreAnError) {
  Job job = makeJob(2);
  job.sites[0].secret_key = "";
  EXPECT_THROW(Gateway g(job.sites[0]), InvalidArgument);
}

TEST(Gateway, SlowPeerIsWaitedFor) {
  Job job = makeJob(2);
  auto g = start(job);
  auto f0 = g[0]->exchange(0, "g", payloadFor(0, 0, 1000));
  std::this_thread::sleep_for(milliseconds(1500));
  EXPECT_EQ(f0.wait_for(milliseconds(0)), std::future_status::timeout);
  auto f1 = g[1]->exchange(0, "g", payloadFor(1, 0, 1000));
  EXPECT_EQ(*getWithin(f0).payloads[1], payloadFor(1, 0, 1000));
  EXPECT_EQ(*getWithin(f1).payloads[0], payloadFor(0, 0, 1000));
}

TEST(Gateway, MissingSiteWithContinueFinishesWithThePresentOnes) {
  Job job = makeJob(3);
  for (auto& o : job.sites) {
    o.on_site_loss = OnSiteLoss::kContinue;
    o.round_deadline = milliseconds(800);
  }
  ::testing::internal::CaptureStderr();
  {
    Gateway a(job.sites[0]), b(job.sites[1]);  // s2 never starts
    auto fa = a.exchange(0, "g", payloadFor(0, 0, 100));
    auto fb = b.exchange(0, "g", payloadFor(1, 0, 100));
    RoundResult ra = getWithin(fa), rb = getWithin(fb);
    EXPECT_EQ(ra.missing, std::vector<std::string>{"s2"});
    EXPECT_FALSE(ra.payloads[2].has_value());
    EXPECT_EQ(*ra.payloads[1], payloadFor(1, 0, 100));
    EXPECT_EQ(*rb.payloads[0], payloadFor(0, 0, 100));
    EXPECT_TRUE(ra.peers[1].missing);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("continuing without s2"), std::string::npos) << log;
}

TEST(Gateway, MissingSiteWithWaitTimesOutNamingIt) {
  Job job = makeJob(2);
  job.sites[0].round_deadline = milliseconds(300);
  job.sites[0].hard_deadline = milliseconds(1200);
  ::testing::internal::CaptureStderr();
  std::string error;
  {
    Gateway a(job.sites[0]);
    auto f = a.exchange(0, "g", {1});
    try {
      getWithin(f);
    } catch (const TimeoutError& e) {
      error = e.what();
    }
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(error.find("no payload from s1 within the hard deadline"), std::string::npos) << error;
  EXPECT_NE(error.find("s1: never connected"), std::string::npos) << error;
  EXPECT_NE(log.find("waiting for s1"), std::string::npos) << log;
}

TEST(Gateway, RestartedPeerRejoinsAndMissedPayloadsAreResent) {
  Job job = makeJob(2);
  auto a = std::make_unique<Gateway>(job.sites[0]);
  {
    auto b = std::make_unique<Gateway>(job.sites[1]);
    auto fa = a->exchange(0, "g", payloadFor(0, 0, 200000));
    auto fb = b->exchange(0, "g", payloadFor(1, 0, 200000));
    getWithin(fa);
    getWithin(fb);
  }  // b is gone
  // a starts round 1 while b is down; b comes back (a new incarnation).
  auto fa = a->exchange(1, "g", payloadFor(0, 1, 200000));
  std::this_thread::sleep_for(milliseconds(300));
  auto b = std::make_unique<Gateway>(job.sites[1]);
  auto fb = b->exchange(1, "g", payloadFor(1, 1, 200000));
  EXPECT_EQ(*getWithin(fa).payloads[1], payloadFor(1, 1, 200000));
  EXPECT_EQ(*getWithin(fb).payloads[0], payloadFor(0, 1, 200000));
}

// s0's gateway after one round with s1, whose gateway has since closed:
// a peer that was up and is gone.
std::unique_ptr<Gateway> afterPeerLeft(const Job& job) {
  auto a = std::make_unique<Gateway>(job.sites[0]);
  Gateway b(job.sites[1]);
  auto fa = a->exchange(0, "g", {1});
  auto fb = b.exchange(0, "g", {2});
  getWithin(fa);
  getWithin(fb);
  return a;
}

TEST(Gateway, LostSiteWithContinueIsNotWaitedForUntilTheRoundDeadline) {
  Job job = makeJob(2);
  for (auto& o : job.sites) {
    o.on_site_loss = OnSiteLoss::kContinue;
    o.peer_timeout = milliseconds(400);
    o.round_deadline = milliseconds(20000);  // far beyond the test's wait
  }
  auto a = afterPeerLeft(job);
  const auto start = std::chrono::steady_clock::now();
  auto f = a->exchange(1, "g", {3});
  ASSERT_EQ(f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  RoundResult r = f.get();
  EXPECT_EQ(r.missing, std::vector<std::string>{"s1"});
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(Gateway, PeerRoundsListsRoundsAPeerOpenedFirst) {
  Job job = makeJob(2);
  Gateway a(job.sites[0]), b(job.sites[1]);
  auto fb = b.exchange(77, "strait.join", {9, 9}, core::MessageKind::kControl);
  std::vector<PeerRound> seen;
  for (int i = 0; i < 200 && seen.empty(); ++i) {
    std::this_thread::sleep_for(milliseconds(20));
    seen = a.peerRounds("strait.join");
  }
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].round, 77u);
  EXPECT_EQ(seen[0].tag, "strait.join");
  EXPECT_EQ(seen[0].site, "s1");
  EXPECT_TRUE(a.peerRounds("other").empty());
  auto fa = a.exchange(77, "strait.join", {1}, core::MessageKind::kControl);
  EXPECT_EQ(*getWithin(fa).payloads[1], (std::vector<uint8_t>{9, 9}));
  getWithin(fb);
  for (int i = 0; i < 50 && !a.peerRounds("strait.join").empty(); ++i) std::this_thread::sleep_for(milliseconds(20));
  EXPECT_TRUE(a.peerRounds("strait.join").empty());
}

TEST(Gateway, APayloadFromARestartedSitesPreviousLifeIsVoid) {
  Job job = makeJob(2);
  Gateway a(job.sites[0]);
  {
    Gateway b(job.sites[1]);
    auto fb = b.exchange(1, "g", {1, 1, 1});  // reaches a before a opens round 1
    ASSERT_TRUE(eventually([&] { return !a.peerRounds("g").empty(); }));
    ASSERT_EQ(a.peerRounds("g").size(), 1u);
  }  // b dies; its new life sends something else for round 1
  // Rounds complete on receipt: a round a opened now would complete with
  // the old life's payload, which is whole here. Once a has heard the new
  // life (silent first, then heard again), the old payload is void.
  ASSERT_TRUE(eventually([&] { return !hears(a, "s1"); }));
  Gateway b2(job.sites[1]);
  auto f2 = b2.exchange(1, "g", {2, 2});
  ASSERT_TRUE(eventually([&] { return hears(a, "s1"); }));
  auto fa = a.exchange(1, "g", {0});
  EXPECT_EQ(*getWithin(fa).payloads[1], (std::vector<uint8_t>{2, 2}));
  EXPECT_EQ(*getWithin(f2).payloads[0], (std::vector<uint8_t>{0}));
}

// Rounds complete on receipt: s0 has s1's payload when it opens the round,
// so its round completes at once, with its own 48 MiB still to send. Its
// gateway, closed right after, lingers until s1 has acknowledged them.
TEST(Gateway, AClosingGatewayLingersUntilItsLastPayloadIsAcknowledged) {
  Job job = makeJob(2);
  Gateway b(job.sites[1]);
  auto fb = b.exchange(0, "g", payloadFor(1, 0, 1000));
  const size_t big = size_t(48) << 20;
  {
    Gateway a(job.sites[0]);
    ASSERT_TRUE(eventually([&] { return !a.peerRounds("g").empty(); }));
    auto fa = a.exchange(0, "g", payloadFor(0, 0, big));
    RoundResult ra = getWithin(fa);
    EXPECT_EQ(*ra.payloads[1], payloadFor(1, 0, 1000));
  }  // closed at once
  RoundResult rb = getWithin(fb);
  EXPECT_EQ(*rb.payloads[0], payloadFor(0, 0, big)) << "s0 closed before its payload had left";
}

TEST(Gateway, WaitModeSaysWhomItWaitsForAsSoonAsThatSiteIsGone) {
  Job job = makeJob(2);
  for (auto& o : job.sites) {
    o.peer_timeout = milliseconds(300);
    o.round_deadline = milliseconds(60000);  // the periodic message would come only after this
    o.hard_deadline = milliseconds(60000);
  }
  auto a = afterPeerLeft(job);
  ::testing::internal::CaptureStderr();
  auto f = a->exchange(1, "g", {3});
  std::this_thread::sleep_for(milliseconds(1500));
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("round 1 'g': waiting for s1"), std::string::npos) << log;
  EXPECT_EQ(f.wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  a.reset();  // the pending round fails with the gateway
}

// The tests' ports come from below the kernel's ephemeral range (where no
// outgoing connection takes a source port), never twice in one process.
TEST(TestPorts, ComeFromBelowTheEphemeralRangeAndNeverTwice) {
  int lo = 32768;
  if (std::FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    ASSERT_EQ(std::fscanf(f, "%d", &lo), 1);
    std::fclose(f);
  }
  std::set<int> seen;
  for (int i = 0; i < 300; ++i) {
    const int port = freePort();
    EXPECT_TRUE(seen.insert(port).second) << port << " handed out twice";
    if (lo - 12000 >= 1024) {
      EXPECT_LT(port, lo) << "inside the ephemeral range";
    }
  }
}

TEST(Gateway, MetricsArriveWithTheResultAndAsJsonLines) {
  Job job = makeJob(2);
  char path[] = "/tmp/strait-metrics-XXXXXX";
  close(mkstemp(path));
  job.sites[0].metrics_path = path;
  {
    auto g = start(job);
    // A tag with characters JSON must escape still gives one valid line.
    const std::string tag = "g\"quoted\\";
    auto f0 = g[0]->exchange(3, tag, payloadFor(0, 3, 150000));
    auto f1 = g[1]->exchange(3, tag, payloadFor(1, 3, 100000));
    RoundResult r = getWithin(f0);
    getWithin(f1);
    ASSERT_EQ(r.peers.size(), 1u);
    EXPECT_EQ(r.peers[0].site, "s1");
    EXPECT_EQ(r.peers[0].bytes_sent, 150000u);
    EXPECT_EQ(r.peers[0].bytes_received, 100000u);
    EXPECT_GT(r.peers[0].goodput_mbps, 0.0);
    EXPECT_GT(r.seconds, 0.0);
  }
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  EXPECT_NE(line.find("\"site\": \"s0\", \"peer\": \"s1\", \"round\": 3"), std::string::npos) << line;
  EXPECT_NE(line.find("\"bytes_received\": 100000"), std::string::npos) << line;
  EXPECT_NE(line.find("\"tag\": \"g\\\"quoted\\\\\""), std::string::npos) << line;
  std::remove(path);
}

}  // namespace
}  // namespace strait::transport
