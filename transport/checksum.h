#pragma once
// The checksum of every payload chunk: XXH3-64 (xxHash 0.8, Debian's
// libxxhash), seed 0. It detects corruption; it is not a MAC — CurveZMQ
// authenticates the bytes on the wire.

#include <cstddef>
#include <cstdint>

namespace strait::transport {

uint64_t chunkChecksum(const void* data, size_t size);

}  // namespace strait::transport
