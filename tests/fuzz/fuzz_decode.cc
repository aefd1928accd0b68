// Compressed payloads from another site: inspect, decode and
// decode-accumulate must reject bad bytes with strait::Error (or decode to
// finite values), never crash, read out of bounds or allocate without bound.
// Input: 4 bytes of value count (little endian, capped), then the payload.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/codec/codec.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);
  n %= 1u << 16;
  const uint8_t* payload = data + 4;
  const size_t len = size - 4;
  try {
    strait::core::inspectPayload(payload, len);
  } catch (const strait::Error&) {
  }
  std::vector<float> out(n);
  try {
    strait::core::decode(payload, len, out.data(), n);
    for (float v : out) {
      if (!std::isfinite(v)) __builtin_trap();  // decoders promise finite values
    }
  } catch (const strait::Error&) {
  }
  std::vector<float> acc(n, 1.0f);
  try {
    strait::core::decodeAccumulate(payload, len, acc.data(), n, 0.5f);
  } catch (const strait::Error&) {
  }
  return 0;
}
