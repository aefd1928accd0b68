#pragma once
// CRC32C (Castagnoli), the checksum of every payload chunk. Uses the SSE4.2
// crc32 instruction where the CPU has it (chosen at run time), a table
// otherwise; both give the same value.

#include <cstddef>
#include <cstdint>

namespace strait::transport {

uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace strait::transport
