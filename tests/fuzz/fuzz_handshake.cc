// The handshake from both ends: a Hello reaching this site's ROUTER (any
// bytes a connecting peer sends first) and the Welcome answering our own
// Hello. checkHello must apply docs/PROTOCOL.md's checks in their order,
// welcome exactly the Hellos that pass all of them, and say which failed; a
// reason echoes the peer's strings at most once each, so a hostile Hello
// cannot make this site log or answer more than a few hundred bytes beyond
// what it sent. Input: one Envelope (the corpus), also read as a bare Hello
// and a bare Welcome.
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "tests/fuzz/gateway_fuzz.h"
#include "transport/gateway.h"
#include "transport/impl/frame.h"

namespace {

using namespace strait::transport;
using strait::wire::Hello;
using strait::wire::Welcome;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

bool startsWith(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

template <typename M>
void roundTrip(const M& m) {
  const std::string bytes = m.SerializeAsString();
  M again;
  check(again.ParseFromString(bytes));
  check(google::protobuf::util::MessageDifferencer::Equals(m, again));
  check(again.SerializeAsString() == bytes);
}

void hello(const Hello& h, const char* user, bool curve) {
  const HelloTerms terms = fuzz::helloTerms(curve);
  const std::string reason = checkHello(h, user, terms);
  const std::string site = "site '" + h.site() + "'";
  const auto at = std::find(terms.peers.begin(), terms.peers.end(), h.site());
  // The first check that fails names itself.
  if (h.protocol_version() != kProtocolVersion) {
    check(startsWith(reason, "protocol version " + std::to_string(h.protocol_version()) + " is not supported"));
  } else if (h.job_id() != terms.job_id) {
    check(startsWith(reason, "job id '" + h.job_id() + "' differs"));
  } else if (h.site() == terms.self) {
    check(startsWith(reason, site + " is this site"));
  } else if (at == terms.peers.end()) {
    check(reason == site + " is not a site of job '" + terms.job_id + "'");
  } else if (curve && (user == nullptr || h.site() != user)) {
    check(startsWith(reason, site + " connected with the key of '"));
  } else if (h.jurisdiction() != terms.jurisdictions[size_t(at - terms.peers.begin())]) {
    check(startsWith(reason, site + " says its jurisdiction is '"));
  } else if (h.config_fingerprint() != terms.config_fingerprint) {
    check(startsWith(reason, "config fingerprint "));
  } else if (h.stream() >= terms.streams) {
    check(startsWith(reason, "stream " + std::to_string(h.stream()) + " is beyond"));
  } else {
    check(reason.empty());
  }
  const size_t user_len = user ? std::strlen(user) : 0;
  check(reason.size() <= 256 + 2 * (h.site().size() + h.job_id().size() + user_len));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged, then refused
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 20)) return 0;  // ZMQ_MAXMSGSIZE bounds a real frame; libFuzzer's -max_len is far below
  const FrameView frame{data, size};
  Message m;
  if (parseMessage(&frame, 1, &m).empty()) {
    roundTrip(m.envelope);
    if (m.envelope.has_hello()) {
      const Hello& h = m.envelope.hello();
      // The honest connection, another site's, an anonymous one; with and
      // without CurveZMQ.
      for (bool curve : {true, false}) {
        hello(h, h.site().c_str(), curve);
        hello(h, "s1", curve);
        hello(h, nullptr, curve);
      }
    }
    if (m.envelope.has_welcome()) {
      const Welcome& w = m.envelope.welcome();
      const std::string refusal = checkWelcome(w, "s1");
      check(w.accepted() ? refusal.empty() : refusal == "site 's1' refused our handshake: " + w.reason());
    }
  }
  Hello h;
  if (h.ParseFromArray(data, int(size))) {
    roundTrip(h);
    hello(h, h.site().c_str(), true);
  }
  Welcome w;
  if (w.ParseFromArray(data, int(size))) {
    roundTrip(w);
    check(checkWelcome(w, "s2").empty() == w.accepted());
  }
  return 0;
}
