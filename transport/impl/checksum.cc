#include "transport/checksum.h"

#include <xxhash.h>

namespace strait::transport {

uint64_t chunkChecksum(const void* data, size_t size) { return XXH3_64bits(data, size); }

}  // namespace strait::transport
