#pragma once
// What fuzz_frame and fuzz_handshake hold hostile messages against, and how
// fuzz_frame splits its input into the frames of one ROUTER-side message.
// fuzz_gateway_seed writes the committed corpus with the same values, so its
// seeds pass every check and mutations start from the accepting paths.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/impl/frame.h"

namespace strait::transport::fuzz {

// This site is "s0" of job "fuzz-job" with peers s1 and s2.
inline HelloTerms helloTerms(bool curve) {
  HelloTerms t;
  t.job_id = "fuzz-job";
  t.self = "s0";
  t.peers = {"s1", "s2"};
  t.jurisdictions = {"DE", "SG"};
  t.config_fingerprint = std::string(32, '\x5a');
  t.curve = curve;
  t.streams = 4;  // a Hello's stream 0-3 is welcome, 4 and above refused
  return t;
}

// The configured default, a tiny chunk size that small inputs can fill, and
// extremes whose arithmetic is near 2^64 (the config allows
// max_message_bytes up to 2^64 - 1).
inline const ChunkLimits kChunkLimits[] = {
    {size_t{1} << 20, size_t{1} << 30},
    {7, 1000},
    {1, SIZE_MAX},
    {4096, SIZE_MAX},
    {size_t{256} << 20, SIZE_MAX},
};

// Frames: each a 2-byte little-endian length and that many bytes; the last
// one takes whatever is left if its length says more. At most kMaxFrames.
constexpr size_t kMaxFrames = 6;

inline std::vector<FrameView> splitFrames(const uint8_t* data, size_t size) {
  std::vector<FrameView> frames;
  while (size >= 2 && frames.size() < kMaxFrames) {
    size_t len = size_t(data[0]) | size_t(data[1]) << 8;
    data += 2;
    size -= 2;
    if (len > size) len = size;
    frames.push_back({data, len});
    data += len;
    size -= len;
  }
  return frames;
}

inline std::string joinFrames(const std::vector<std::string>& frames) {
  std::string out;
  for (const std::string& f : frames) {
    out += char(f.size() & 0xff);
    out += char(f.size() >> 8);
    out += f;
  }
  return out;
}

}  // namespace strait::transport::fuzz
