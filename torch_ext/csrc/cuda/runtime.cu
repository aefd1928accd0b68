// The CUDA part's home: compiled by nvcc into libstrait_torch when
// STRAIT_WITH_CUDA (torch_ext/CMakeLists.txt). Device kernels for the codecs
// belong in this folder, next to this file.

#include <cuda_runtime.h>

#include "torch_ext/csrc/cuda/runtime.h"

namespace strait::torch_ext::cuda {

int runtimeVersion() noexcept {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int deviceCount() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no GPU: not an error for the caller
    return 0;
  }
  return n;
}

}  // namespace strait::torch_ext::cuda
