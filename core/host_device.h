#pragma once
// STRAIT_HOST_DEVICE marks the per-element arithmetic that the CPU code and
// the CUDA kernels (torch_ext/csrc/cuda/) share: one definition, compiled by
// g++ for the host and by nvcc for both.

#if defined(__CUDACC__)
#define STRAIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STRAIT_HOST_DEVICE inline
#endif
