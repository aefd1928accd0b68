#pragma once
// Run-time SIMD dispatch. Hot kernels are written once as always-inline
// templates and instantiated twice: a baseline x86-64 version and one compiled
// for x86-64-v3 (AVX2 + FMA + F16C), chosen at run time from CPUID. The default
// build therefore runs on any x86-64 and still uses AVX2 where it exists.
// STRAIT_SIMD=generic in the environment forces the baseline path.

// Under nvcc (torch_ext/csrc/cuda/) the same bodies are device code too.
#if defined(__CUDACC__)
#define STRAIT_INLINE __host__ __device__ __forceinline__
#else
#define STRAIT_INLINE inline __attribute__((always_inline))
#endif

#if defined(__x86_64__)
#define STRAIT_HAVE_X86_DISPATCH 1
#define STRAIT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#else
#define STRAIT_HAVE_X86_DISPATCH 0
#define STRAIT_TARGET_AVX2
#endif

namespace strait::core::simd {

// True when the AVX2 path is usable on this CPU and not disabled by
// STRAIT_SIMD=generic. Computed once.
bool useAvx2();

// "avx2" or "generic": which path the kernels take.
const char* pathName();

}  // namespace strait::core::simd

// Declares `name` as a dispatcher over two instantiations of the always-inline
// body `name##Body`. Usage:
//   STRAIT_INLINE void scaleBody(float* x, size_t n, float s) { ... }
//   STRAIT_DISPATCH(void, scale, (float* x, size_t n, float s), (x, n, s))
#if STRAIT_HAVE_X86_DISPATCH
#define STRAIT_DISPATCH(ret, name, params, args)                         \
  STRAIT_TARGET_AVX2 ret name##Avx2 params { return name##Body args; }  \
  ret name##Generic params { return name##Body args; }                   \
  ret name params {                                                      \
    return ::strait::core::simd::useAvx2() ? name##Avx2 args : name##Generic args; \
  }
#else
#define STRAIT_DISPATCH(ret, name, params, args) \
  ret name params { return name##Body args; }
#endif
