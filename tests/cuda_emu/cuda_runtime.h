// Host emulation of the CUDA features csrc/reft_cuda.cu uses, for testing its kernels without a GPU.
// A block's threads are ucontext fibers run round-robin: each runs until its next __syncthreads
// (or its end), so every barrier phase completes for all threads before the next one starts.
// __shared__ variables become statics (blocks run one after another); the launch syntax is
// rewritten to emu_launch(grid, block, smem, stream, &kernel, args...) by the test.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0, cudaErrorInvalidValue = 1;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 3;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

struct EmuFiber {
  ucontext_t ctx;
  std::vector<char> stack = std::vector<char>(1 << 16);
  bool done = false;
};
inline ucontext_t emu_main;
inline std::vector<EmuFiber> emu_fibers;
inline unsigned emu_cur = 0;
inline std::function<void()> emu_body;
inline double emu_slot[1024];
inline unsigned char emu_dyn_smem[1 << 16];

inline void __syncthreads() { swapcontext(&emu_fibers[emu_cur].ctx, &emu_main); }
template <typename T> T __shfl_xor_sync(unsigned, T x, int o) {
  emu_slot[threadIdx.x] = static_cast<double>(x);
  __syncthreads();
  T y = static_cast<T>(emu_slot[threadIdx.x ^ o]);
  __syncthreads();
  return y;
}
inline void emu_trampoline() {
  emu_body();
  emu_fibers[emu_cur].done = true;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(x)

template <typename K, typename... Args>
void emu_launch(dim3 g, dim3 b, size_t, cudaStream_t, K kernel, Args... args) {
  gridDim = g;
  blockDim = b;
  emu_fibers.resize(b.x);
  emu_body = [&] { kernel(args...); };
  for (unsigned by = 0; by < g.y; ++by)
    for (unsigned bx = 0; bx < g.x; ++bx) {
      blockIdx = dim3(bx, by);
      for (auto& f : emu_fibers) {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &emu_main;
        f.done = false;
        makecontext(&f.ctx, emu_trampoline, 0);
      }
      for (bool running = true; running;) {  // one barrier phase per sweep
        running = false;
        for (unsigned t = 0; t < b.x; ++t) {
          if (emu_fibers[t].done) continue;
          emu_cur = t;
          threadIdx = dim3(t);
          swapcontext(&emu_main, &emu_fibers[t].ctx);
          running = true;
        }
      }
    }
}
