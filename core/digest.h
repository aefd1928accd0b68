#pragma once
// The digest of a float32 vector (a model's global parameters): the sum, mod
// 2^64, of a hash of each element's bits and position. It tells replicas
// apart (any change of one element changes it: the per-element hash is a
// bijection of the bits) without being a cryptographic commitment; sites
// compare it every DiLoCo sync and name checkpoints by it.
//
// A sum is free of order: any split of the vector into slices, summed on any
// device in any order, gives the same 64 bits. So a GPU digests parameters
// where they live (torch_ext/csrc/cuda/), and a sharded model digests its
// shards. Pure functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/host_device.h"
#include "core/random.h"

namespace strait::core {

// The term of the element at `index` whose float32 bits are `bits`:
// random::mix64 (a bijection of 64 bits) of bits + index * 0x9e3779b97f4a7c15.
STRAIT_HOST_DEVICE uint64_t digestTerm(uint32_t bits, uint64_t index) {
  return random::mix64(uint64_t(bits) + index * 0x9e3779b97f4a7c15ULL);
}

// The sum of digestTerm over x[0..n), x[i] standing at position first + i.
uint64_t digestSum(const float* x, size_t n, uint64_t first = 0);

// 16 lowercase hex digits.
std::string digestHex(uint64_t digest);

}  // namespace strait::core
