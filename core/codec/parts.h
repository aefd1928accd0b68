#pragma once
// Several compressed payloads in one message: how a sync of many tensors
// (DiLoCo's parameters, a step's tensors in the libtorch API) crosses the
// border in one round. The format (docs/PROTOCOL.md, "Parts"): n + 1
// little-endian u64 — n, then each part's byte length in order — followed by
// the n parts. Pure functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace strait::core {

struct PartView {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

// The message holding `parts`, in order.
std::vector<uint8_t> frameParts(const std::vector<std::vector<uint8_t>>& parts);

// The parts of a message that must hold exactly `expect` of them, as views
// into `data`. Throws ProtocolError ("framing does not match N parts (M
// bytes)") on any other count, a length that overruns, or trailing bytes.
std::vector<PartView> splitParts(const uint8_t* data, size_t size, size_t expect);

}  // namespace strait::core
