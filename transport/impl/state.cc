#include "transport/state.h"

#include <cstring>

#include "core/bytes.h"
#include "core/error.h"
#include "transport/proto/strait.pb.h"

namespace strait::transport {

namespace {

// Far above any real header (names, a few counters), far below memory.
constexpr uint64_t kMaxHeaderBytes = 1 << 20;

}  // namespace

uint64_t State::counter(const std::string& name, const std::string& what) const {
  const auto it = counters.find(name);
  if (it == counters.end()) fail<ProtocolError>(what, ": no counter '", name, "'");
  return it->second;
}

const std::string& State::string(const std::string& name, const std::string& what) const {
  const auto it = strings.find(name);
  if (it == strings.end()) fail<ProtocolError>(what, ": no string '", name, "'");
  return it->second;
}

bool State::has(const std::string& name) const {
  for (const StateSection& s : sections) {
    if (s.name == name) return true;
  }
  return false;
}

const StateSection& State::section(const std::string& name, SectionType type, const std::string& what,
                                   size_t count) const {
  for (const StateSection& s : sections) {
    if (s.name != name) continue;
    if (s.type != type) fail<ProtocolError>(what, ": section '", name, "' has type ", uint32_t(s.type));
    if (count != size_t(-1) && s.count() != count) {
      fail<ProtocolError>(what, ": section '", name, "' holds ", s.count(), " elements; expected ", count);
    }
    return s;
  }
  fail<ProtocolError>(what, ": no section '", name, "'");
}

std::vector<uint8_t> encodeStateHeader(const State& state) {
  wire::StateHeader h;
  for (const auto& kv : state.counters) {
    wire::StateCounter* c = h.add_counters();
    c->set_name(kv.first);
    c->set_value(kv.second);
  }
  for (const auto& kv : state.strings) {
    wire::StateText* t = h.add_strings();
    t->set_name(kv.first);
    t->set_value(kv.second);
  }
  for (const StateSection& s : state.sections) {
    wire::StateSection* w = h.add_sections();
    w->set_name(s.name);
    w->set_type(uint32_t(s.type));
    w->set_bytes(s.size);
  }
  std::string bytes;
  h.SerializeToString(&bytes);
  std::vector<uint8_t> out;
  core::ByteWriter w(out);
  w.put<uint64_t>(bytes.size());
  if (!bytes.empty()) std::memcpy(w.extend(bytes.size()), bytes.data(), bytes.size());
  return out;
}

std::vector<uint8_t> encodeState(const State& state) {
  std::vector<uint8_t> out = encodeStateHeader(state);
  size_t total = out.size();
  for (const StateSection& s : state.sections) total += s.size;
  out.reserve(total);
  for (const StateSection& s : state.sections) {
    if (s.size) out.insert(out.end(), s.data, s.data + s.size);
  }
  return out;
}

State decodeState(const uint8_t* data, size_t size, const std::string& what) {
  if (size < 8) fail<ProtocolError>(what, " of ", size, " bytes: too short for a state");
  uint64_t n;
  std::memcpy(&n, data, 8);
  if (n > kMaxHeaderBytes || n > size - 8) {
    fail<ProtocolError>(what, " whose header (", n, " bytes) overruns its ", size, " bytes");
  }
  wire::StateHeader h;
  if (!h.ParseFromArray(data + 8, static_cast<int>(n))) fail<ProtocolError>(what, " with a malformed header");
  State s;
  for (const wire::StateCounter& c : h.counters()) {
    if (!s.counters.emplace(c.name(), c.value()).second) fail<ProtocolError>(what, ": counter '", c.name(), "' twice");
  }
  for (const wire::StateText& t : h.strings()) {
    if (!s.strings.emplace(t.name(), t.value()).second) fail<ProtocolError>(what, ": string '", t.name(), "' twice");
  }
  size_t at = 8 + static_cast<size_t>(n);
  for (const wire::StateSection& w : h.sections()) {
    StateSection sec;
    sec.name = w.name();
    const uint32_t type = w.type();
    if (type < 1 || type > 3) fail<ProtocolError>(what, ": section '", sec.name, "' of unknown type ", type);
    sec.type = SectionType(type);
    if (w.bytes() > size - at) {
      fail<ProtocolError>(what, ": section '", sec.name, "' (", w.bytes(), " bytes) overruns the message");
    }
    sec.size = static_cast<size_t>(w.bytes());
    const size_t unit = sec.type == SectionType::kFloat32 ? 4 : sec.type == SectionType::kU64 ? 8 : 1;
    if (sec.size % unit) fail<ProtocolError>(what, ": section '", sec.name, "' of ", sec.size, " bytes is ragged");
    sec.data = data + at;
    at += sec.size;
    s.sections.push_back(std::move(sec));
  }
  if (at != size) fail<ProtocolError>(what, ": ", size - at, " bytes after its last section");
  return s;
}

}  // namespace strait::transport
