#include "transport/impl/peer_table.h"

#include <cstdio>

namespace strait::transport {

PeerTable::PeerTable(std::vector<std::string> sites, size_t self, std::chrono::milliseconds peer_timeout)
    : timeout_(peer_timeout) {
  state_.resize(sites.size());
  for (size_t i = 0; i < sites.size(); ++i) {
    state_[i].index = i;
    state_[i].name = std::move(sites[i]);
    if (i != self) peers_.push_back(i);
  }
}

long PeerTable::find(const std::string& name) const {
  for (size_t i : peers_) {
    if (state_[i].name == name) return long(i);
  }
  return -1;
}

HelloLife PeerTable::hello(size_t site, uint64_t incarnation, Clock::time_point now) {
  PeerState& p = state_[site];
  p.greeted = true;
  p.last_heard = now;
  // A Stopped is about its life: a Hello of the same life read after it
  // (each stream says Hello on its own connection, so their order against
  // the Stopped is lost) does not take it back; a new life does.
  if (p.incarnation != incarnation) p.stopped.clear();
  p.refused.clear();
  return life(site, incarnation);
}

HelloLife PeerTable::life(size_t site, uint64_t incarnation) {
  PeerState& p = state_[site];
  if (p.incarnation == incarnation) return HelloLife::kSame;
  const bool first = p.incarnation == 0;
  p.incarnation = incarnation;
  return first ? HelloLife::kFirst : HelloLife::kRestarted;
}

void PeerTable::heard(size_t site, Clock::time_point now) { state_[site].last_heard = now; }

void PeerTable::stopped(size_t site, uint64_t incarnation, const std::string& reason) {
  if (state_[site].incarnation == incarnation) state_[site].stopped = reason;
}

void PeerTable::refused(size_t site, const std::string& reason, Clock::time_point now) {
  state_[site].refused = reason;
  state_[site].refused_at = now;
}

std::string PeerTable::gone(size_t site) const {
  const PeerState& p = state_[site];
  if (!p.refused.empty()) return "was refused in the handshake here: " + p.refused;
  if (!p.stopped.empty()) return "stopped: " + p.stopped;
  return "";
}

std::vector<size_t> PeerTable::tick(Clock::time_point now) {
  std::vector<size_t> back;
  for (size_t i : peers_) {
    PeerState& p = state_[i];
    const bool gone = lost(i, now);
    if (!p.lost && gone) {
      p.lost = true;
      p.lost_incarnation = p.incarnation;
    } else if (p.lost && !gone) {
      p.lost = false;
      // Heard again in the same life: the link was cut (a partition), not
      // the process (a restart says Hello with a new incarnation).
      if (p.incarnation == p.lost_incarnation) back.push_back(i);
    }
  }
  return back;
}

bool PeerTable::lost(size_t site, Clock::time_point now) const {
  const PeerState& p = state_[site];
  return !p.refused.empty() || (p.greeted && now - p.last_heard >= timeout_);
}

bool PeerTable::silent(size_t site, Clock::time_point now) const {
  const PeerState& p = state_[site];
  return !p.refused.empty() || !p.greeted || now - p.last_heard >= timeout_;
}

std::vector<std::string> PeerTable::live(Clock::time_point now) const {
  std::vector<std::string> out;
  for (size_t i : peers_) {
    if (!silent(i, now)) out.push_back(state_[i].name);
  }
  return out;
}

std::string PeerTable::silence(const std::vector<size_t>& sites, Clock::time_point now) const {
  std::string s;
  for (size_t i : sites) {
    const PeerState& p = state_[i];
    char ago[32];
    std::snprintf(ago, sizeof ago, "%.1f", std::chrono::duration<double>(now - p.last_heard).count());
    s += (s.empty() ? "" : "; ") + p.name + ": " +
         (!gone(i).empty() ? gone(i)
          : p.greeted    ? "last heard " + std::string(ago) + " s ago"
          : !p.trouble.empty() ? "never connected: " + p.trouble
                               : "never connected");
  }
  return s;
}

}  // namespace strait::transport
