#pragma once
// The gateway's peer table (transport-internal): the other sites' liveness
// and lives (incarnations) as this site's ROUTER hears them. A pure state
// machine: events in (a welcomed Hello, any valid message, the clock), answers
// out (is a site lost, silent, back after a silence in the same life). Time is
// an argument, never read here, so tests replay any sequence of events
// without sockets or sleeps. Not thread-safe: the gateway's I/O thread owns it.
//
// "Lost": greeted (its Hello was welcomed on our ROUTER) and silent for
// peer_timeout since, or refused: its Hello was refused here (until a Hello
// of it is welcomed). A site that said it stopped is not lost until it is
// silent: it may restart, and a round must not complete with what its old
// life sent before its new life is heard. "Silent": lost, or never heard. A site that comes back in the same
// life after being lost was cut off (a partition, a freeze), not restarted:
// tick() reports it once.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace strait::transport {

using Clock = std::chrono::steady_clock;

struct PeerState {
  size_t index = 0;                 // its position in the job's sites
  std::string name;
  bool greeted = false;             // a Hello of it was welcomed on our ROUTER
  uint64_t incarnation = 0;         // its gateway's life, from its Hello or its Welcome (0: unknown)
  Clock::time_point last_heard{};   // any valid message from it
  bool lost = false;                // as of the last tick()
  uint64_t lost_incarnation = 0;    // its life when it was lost
  // What it said when it stopped (its Stopped message): it is waited for as
  // a lost site is (it may restart), but whoever waits is told why.
  std::string stopped;
  // Why this site refused its Hello (another config, version or
  // jurisdiction): it cannot take part in this life.
  std::string refused;
  Clock::time_point refused_at{};
  // What goes wrong reaching it (a CurveZMQ handshake with its endpoint
  // that fails: a key that is not the job's?), until one of our connections
  // to it is welcomed.
  std::string trouble;
};

// What a welcomed Hello says about the sender's life.
enum class HelloLife {
  kSame,       // the life this site knows: a reconnect
  kFirst,      // its first Hello this site welcomed
  kRestarted,  // a new life: it restarted and lost what it held
};

class PeerTable {
 public:
  // `sites`: every site's name in job order; `self`: this site's index.
  PeerTable(std::vector<std::string> sites, size_t self, std::chrono::milliseconds peer_timeout);

  const std::vector<size_t>& peers() const { return peers_; }  // site indices, self excluded
  const PeerState& at(size_t site) const { return state_[site]; }
  // The site index of a peer named `name`, or -1 (this site's own name too).
  long find(const std::string& name) const;

  // Its Hello was welcomed on our ROUTER: its DEALER reached us, and from
  // now on its silence counts.
  HelloLife hello(size_t site, uint64_t incarnation, Clock::time_point now);
  // Its Welcome (on our DEALER) named its life. That says nothing of its
  // DEALER: a peer whose connection to our ROUTER is still to come (its
  // reconnect backs off for seconds) must not be judged silent by it, or a
  // restarted site goes on without the peer it is asking to join.
  HelloLife life(size_t site, uint64_t incarnation);
  void heard(size_t site, Clock::time_point now);
  // It said it stops (a Stopped message of its life `incarnation`; another
  // life's is ignored).
  void stopped(size_t site, uint64_t incarnation, const std::string& reason);
  // This site refused its Hello (its config, version or jurisdiction
  // differs): it cannot take part until it comes back otherwise.
  void refused(size_t site, const std::string& reason, Clock::time_point now);
  // Why it is not taking part, as words ("stopped: ...", "was refused in
  // the handshake here: ..."); "" when nothing is known against it.
  std::string gone(size_t site) const;
  void trouble(size_t site, const std::string& what) { state_[site].trouble = what; }
  // Updates who is lost; returns the sites back after a silence in the same life.
  std::vector<size_t> tick(Clock::time_point now);

  bool lost(size_t site, Clock::time_point now) const;
  bool silent(size_t site, Clock::time_point now) const;
  std::vector<std::string> live(Clock::time_point now) const;  // heard within peer_timeout
  // "beta: last heard 3.2 s ago; gamma: never connected"
  std::string silence(const std::vector<size_t>& sites, Clock::time_point now) const;

 private:
  std::vector<PeerState> state_;  // per site (own index unused)
  std::vector<size_t> peers_;
  std::chrono::milliseconds timeout_;
};

}  // namespace strait::transport
