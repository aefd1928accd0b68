#pragma once
// A state document: named counters, strings and byte sections (float32,
// u64 or raw bytes). One container for what a running site hands a site
// that joins (DiLoCo's global parameters and outer momentum, every-step
// mode's parameters and optimizer state), a join request, and a checkpoint
// file, so the engine writes and checks one format (docs/PROTOCOL.md,
// "States"): a u64 header length, a protobuf StateHeader, the sections'
// bytes in order.
//
// Decoding treats the bytes as hostile: every length is checked against
// what is there before anything is trusted, and sections are views into
// the decoded buffer (no copy). Pure functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace strait::transport {

enum class SectionType : uint32_t { kFloat32 = 1, kU64 = 2, kBytes = 3 };

struct StateSection {
  std::string name;
  SectionType type = SectionType::kBytes;
  const uint8_t* data = nullptr;  // borrowed: the caller's memory, or the decoded buffer
  size_t size = 0;                // bytes

  size_t count() const { return type == SectionType::kFloat32 ? size / 4 : type == SectionType::kU64 ? size / 8 : size; }
};

struct State {
  std::map<std::string, uint64_t> counters;
  std::map<std::string, std::string> strings;
  std::vector<StateSection> sections;

  // Throw ProtocolError naming `what` and the missing name.
  uint64_t counter(const std::string& name, const std::string& what) const;
  const std::string& string(const std::string& name, const std::string& what) const;
  // A section of `type` (and, unless npos, `count` elements); ProtocolError otherwise.
  const StateSection& section(const std::string& name, SectionType type, const std::string& what,
                              size_t count = size_t(-1)) const;
  bool has(const std::string& name) const;  // a section of that name
};

// The u64 length and the header: what precedes the sections' bytes.
std::vector<uint8_t> encodeStateHeader(const State& state);
// The whole document (header and sections) in one buffer.
std::vector<uint8_t> encodeState(const State& state);

// Parses a document; sections point into data. Throws ProtocolError whose
// message starts with `what` (e.g. "site 'beta' sent a join message") on a
// truncated or malformed header, an unknown section type, a float32 or u64
// section whose length is not a whole number of elements, sections that
// overrun, or trailing bytes.
State decodeState(const uint8_t* data, size_t size, const std::string& what);

}  // namespace strait::transport
