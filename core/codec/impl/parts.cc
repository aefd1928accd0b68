#include "core/codec/parts.h"

#include <cstring>

#include "core/bytes.h"
#include "core/error.h"

namespace strait::core {

std::vector<uint8_t> frameParts(const std::vector<std::vector<uint8_t>>& parts) {
  size_t total = 8 * (parts.size() + 1);
  for (const auto& p : parts) total += p.size();
  std::vector<uint8_t> out;
  out.reserve(total);
  ByteWriter w(out);
  w.put<uint64_t>(parts.size());
  for (const auto& p : parts) w.put<uint64_t>(p.size());
  for (const auto& p : parts) {
    if (!p.empty()) std::memcpy(w.extend(p.size()), p.data(), p.size());
  }
  return out;
}

std::vector<PartView> splitParts(const uint8_t* data, size_t size, size_t expect) {
  auto mismatch = [&] {
    fail<ProtocolError>("a message whose framing does not match ", expect, " parts (", size, " bytes)");
  };
  // The header alone must fit before any length is trusted.
  if (size < 8 || expect > size / 8 - 1) mismatch();
  ByteReader r(data, size);
  if (r.get<uint64_t>("the part count") != expect) mismatch();
  std::vector<uint64_t> lengths(expect);
  for (uint64_t& n : lengths) n = r.get<uint64_t>("a part's length");
  uint64_t left = r.remaining();  // the parts' bytes: each length must fit in what the others left
  for (uint64_t n : lengths) {
    if (n > left) mismatch();
    left -= n;
  }
  if (left != 0) mismatch();
  std::vector<PartView> parts(expect);
  for (size_t i = 0; i < expect; ++i) {
    parts[i].size = static_cast<size_t>(lengths[i]);
    parts[i].data = r.take(parts[i].size, "a part");
  }
  return parts;
}

}  // namespace strait::core
