#pragma once
// Counter-based random numbers and integer hashes: the value for position
// i depends only on (seed, i), so kernels vectorise, a receiver can
// regenerate a sender's random-k indices from the seed alone, and a GPU
// kernel computes the same bits (STRAIT_HOST_DEVICE).

#include <cstdint>

#include "core/host_device.h"

namespace strait::core::random {

// Chris Wellons' "lowbias32" integer hash (bias ~0.17 on his avalanche metric).
STRAIT_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// SplitMix64's finaliser (Steele, Lea, Flood 2014).
STRAIT_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [0, 1) with 24 random bits, from the j-th draw of a stream keyed by base.
STRAIT_HOST_DEVICE float uniform01(uint32_t base, uint32_t j) {
  // Through int32: a signed conversion vectorises (cvtdq2ps), an unsigned one does not.
  return static_cast<float>(static_cast<int32_t>(mix32(base + j * 0x9e3779b9U) >> 8)) *
         (1.0f / 16777216.0f);
}

// A key for block b of an encode with the given seed.
STRAIT_HOST_DEVICE uint32_t blockKey(uint64_t seed, uint64_t block) {
  return static_cast<uint32_t>(mix64(seed ^ mix64(block)));
}

// Standard normal via Box-Muller from two counter-based uniforms.
float normal(uint64_t seed, uint64_t i);

}  // namespace strait::core::random
