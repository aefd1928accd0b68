#include "transport/privacy.h"

#include <sodium.h>

#include <cmath>
#include <limits>

#include "core/error.h"

namespace strait::transport {

double gaussianRdp(double sigma, uint64_t releases, double alpha) {
  return double(releases) * alpha / (2 * sigma * sigma);
}

double gaussianEpsilon(double sigma, uint64_t releases, double delta) {
  if (!(sigma > 0) || !(delta > 0 && delta < 1)) {
    fail<InvalidArgument>("privacy: sigma must be > 0 and delta in (0, 1)");
  }
  if (releases == 0) return 0;
  double best = std::numeric_limits<double>::infinity();
  // A geometric grid of orders, fine enough that the minimum is within a
  // fraction of a percent of the continuous one.
  for (double a = 1.0 + 1e-3; a <= 1e4; a *= 1.01) {
    const double eps = gaussianRdp(sigma, releases, a) + std::log((a - 1) / a) -
                       (std::log(delta) + std::log(a)) / (a - 1);
    if (eps < best) best = eps;
  }
  return std::max(0.0, best);
}

double clipAndNoise(float* x, size_t n, double clip, double sigma, double whole) {
  if (sodium_init() < 0) fail<Error>("libsodium failed to initialise");
  double sq = 0;
  if (whole < 0) {
    for (size_t i = 0; i < n; ++i) sq += double(x[i]) * x[i];
  }
  const double norm = whole < 0 ? std::sqrt(sq) : whole;
  const double scale = norm > clip ? clip / norm : 1.0;
  const double sd = sigma * clip;
  // Box-Muller on 53-bit uniforms from the CSPRNG, two normals per pair.
  constexpr size_t kBatch = 1024;
  uint64_t bits[kBatch];
  for (size_t i = 0; i < n;) {
    randombytes_buf(bits, sizeof bits);
    for (size_t k = 0; k + 1 < kBatch && i < n; k += 2) {
      const double u1 = (double(bits[k] >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
      const double u2 = double(bits[k + 1] >> 11) * 0x1.0p-53;       // [0, 1)
      const double r = std::sqrt(-2.0 * std::log(u1));
      const double z0 = r * std::cos(2 * M_PI * u2), z1 = r * std::sin(2 * M_PI * u2);
      x[i] = float(x[i] * scale + sd * z0);
      ++i;
      if (i < n) {
        x[i] = float(x[i] * scale + sd * z1);
        ++i;
      }
    }
  }
  return norm;
}

}  // namespace strait::transport
