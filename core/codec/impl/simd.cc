#include "core/codec/impl/simd.h"

#include <cstdlib>
#include <cstring>

#if STRAIT_HAVE_X86_DISPATCH
#include <cpuid.h>
#endif

namespace strait::core::simd {

namespace {
bool detect() {
  const char* forced = std::getenv("STRAIT_SIMD");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
#if STRAIT_HAVE_X86_DISPATCH
  __builtin_cpu_init();
  // f16c and bmi2 from CPUID directly: clang's __builtin_cpu_supports does
  // not know them (GCC's does); the bits are the same everywhere.
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
  const bool bmi2 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 8)) != 0;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c && bmi2;
#else
  return false;
#endif
}
}  // namespace

bool useAvx2() {
  static const bool kAvx2 = detect();
  return kAvx2;
}

const char* pathName() { return useAvx2() ? "avx2" : "generic"; }

}  // namespace strait::core::simd
