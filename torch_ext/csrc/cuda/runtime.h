#pragma once
// The CUDA part of the extension (compiled when STRAIT_WITH_CUDA): what the
// CUDA runtime in this process says. No torch headers here: files under
// csrc/cuda/ are compiled by nvcc, which is slow on torch's headers.

namespace strait::torch_ext::cuda {

// The CUDA runtime's version (e.g. 13000 for 13.0); 0 if it cannot be asked.
// Needs no driver or GPU. Never throws.
int runtimeVersion() noexcept;

// The GPUs this process can use; 0 without a driver or a GPU. Never throws.
int deviceCount() noexcept;

}  // namespace strait::torch_ext::cuda
