#pragma once
// Site-level differential privacy: each release of a site's update is a
// Gaussian mechanism (clip the whole update to L2 norm C, add N(0, (sigma C)^2)
// to every value), and a Renyi-DP accountant composes the releases.
//
// This protects the *site's* contribution as a whole (neighbouring datasets
// differ in everything the site holds), not individual examples.

#include <cstddef>
#include <cstdint>

namespace strait::transport {

// RDP of `releases` Gaussian mechanisms of noise multiplier sigma at order
// alpha: releases * alpha / (2 sigma^2) (Mironov 2017, Prop. 7 and composition).
double gaussianRdp(double sigma, uint64_t releases, double alpha);

// The smallest epsilon such that `releases` Gaussian mechanisms are
// (epsilon, delta)-DP by the RDP conversion of Canonne, Kamath and Steinke
// 2020 (Prop. 12), minimised over orders alpha in (1, 10^4].
double gaussianEpsilon(double sigma, uint64_t releases, double delta);

// Clips x to L2 norm `clip` (scaling it down, never up) and adds independent
// Gaussian noise of standard deviation sigma * clip, drawn from libsodium's
// CSPRNG. Returns the norm before clipping. `norm` >= 0: x is a share of a
// larger update of that norm (a sharded site's, summed across its ranks),
// which is what is clipped: x is scaled by min(1, clip / norm).
double clipAndNoise(float* x, size_t n, double clip, double sigma, double norm = -1);

}  // namespace strait::transport
