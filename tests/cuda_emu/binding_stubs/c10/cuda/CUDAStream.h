// Stand-in for c10/cuda/CUDAStream.h (see CUDAGuard.h here).
#pragma once
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
