#include "core/digest.h"

#include <cstdio>
#include <cstring>

namespace strait::core {

uint64_t digestSum(const float* x, size_t n, uint64_t first) {
  uint64_t sum = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    sum += digestTerm(bits, first + i);
  }
  return sum;
}

std::string digestHex(uint64_t digest) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(digest));
  return text;
}

}  // namespace strait::core
