#include "core/codec/impl/simd.h"

#include <cstdlib>
#include <cstring>

namespace strait::core::simd {

namespace {
bool detect() {
  const char* forced = std::getenv("STRAIT_SIMD");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
#if STRAIT_HAVE_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
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
