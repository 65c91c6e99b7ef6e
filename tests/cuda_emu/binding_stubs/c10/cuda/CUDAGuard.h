// Stand-in for c10/cuda/CUDAGuard.h: lets the torch binding (csrc/reft_cuda_binding.cpp) be
// compile-checked on a machine without CUDA (tests/test_native_cuda_emulation.py).
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
