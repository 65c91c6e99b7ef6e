// CUDA backend of the ReFT op (math: reft_rows.h). Torch-free: only c10's BFloat16/Half
// value types, so CI can compile-check it quickly; reft_cuda_binding.cpp binds it to torch.
//
// forward:   one block per selected row. Pass 1: the block's threads stride over the row and
//            accumulate the dot products (W h)_k, (P h)_k (ranks in register chunks of KC),
//            a deterministic block reduction gives s; pass 2 writes h + P^T s (with dropout).
// backward:  (1) coef_kernel, one block per row: u = P g', W h, P h -> coefficients s, u, v
//            stored as (N, 3, r); (2) cols_kernel, grid (column tiles, K row chunks): each thread
//            owns one column j, walks its chunk's rows in order, writes grad_h and accumulates
//            grad_P[:, j], grad_W[:, j] in registers, then stores them in the chunk's partial;
//            (3) sum_chunks adds the K partials in chunk order. Memory: K x (2 r d + 2 r) with
//            K ~ 2 x SMs / column tiles, independent of N; no atomics, so results are deterministic.
// per-row adapters (the op's stacked layout): `adapter` (N,) non-null (null: every entry adapter 0);
//            P, W (A, r, d) and b, c (A, r) are stacked and a row block uses its entry's slice.
//            The backward's chunks become (adapter, part) pairs over the entries ordered by
//            adapter (`order`, `starts`: a stable sort done by the binding), so a column block
//            only ever reads one adapter's weights and writes that adapter's partial; sum_chunks
//            then adds each adapter's K partials in order.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "reft_cuda.h"

namespace reft_cuda {
namespace {

using reft::RowParams;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Sum v[i] over the block; every thread gets the totals. Fixed order: xor-shuffle tree inside a
// warp, then the warps' sums added in warp order. `red` holds kWarps * NV values.
template <typename A, int NV> __device__ __forceinline__ void block_sum(A (&v)[NV], A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A x = v[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    v[i] = x;
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A t = A(0);
    for (int w = 0; w < kWarps; ++w) t += red[w * NV + i];
    v[i] = t;
  }
  __syncthreads();
}

template <typename T, typename A, int KC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(T* __restrict__ x, const int64_t* __restrict__ rows,
                   const int64_t* __restrict__ adapter, T* __restrict__ saved, RowParams<A> p0) {
  __shared__ A red[kWarps * 2 * KC];
  extern __shared__ __align__(16) unsigned char smem[];
  A* s = reinterpret_cast<A*>(smem);  // (r,)
  const int64_t n = blockIdx.x, d = p0.d, row = rows[n];
  const RowParams<A> p = adapter ? reft::slice(p0, adapter[n]) : p0;
  T* sv = saved + n * d;
  if (row < 0) {
    for (int64_t j = threadIdx.x; j < d; j += kThreads) sv[j] = T(0);
    return;
  }
  T* xr = x + row * d;
  for (int k0 = 0; k0 < p.r; k0 += KC) {
    A acc[2 * KC];  // [(W h)_k0.., (P h)_k0..]
#pragma unroll
    for (int i = 0; i < 2 * KC; ++i) acc[i] = A(0);
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const T raw = xr[j];
      if (k0 == 0) sv[j] = raw;
      const A hj = static_cast<A>(raw);
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        const int k = k0 + kk;
        if (k < p.r) {
          if (p.has_weight) acc[kk] += p.W[k * d + j] * hj;
          if (p.subtract_proj) acc[KC + kk] += p.P[k * d + j] * hj;
        }
      }
    }
    block_sum<A, 2 * KC>(acc, red);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int kk = 0; kk < KC; ++kk)
        if (k0 + kk < p.r) s[k0 + kk] = reft::source_coeff(p, k0 + kk, acc[kk], acc[KC + kk]);
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A o = reft::edit_elem(p, s, static_cast<A>(xr[j]), j) * reft::keep_scale(p, row, j);
    xr[j] = static_cast<T>(o);
  }
}

// coef[n] = [s (r) | u (r) | v (r)] of row n (zeros for skipped entries).
template <typename T, typename A, int KC>
__global__ void __launch_bounds__(kThreads)
    coef_kernel(const T* __restrict__ grad, const int64_t* __restrict__ rows,
                const int64_t* __restrict__ adapter, const T* __restrict__ saved, RowParams<A> p0,
                A* __restrict__ coef) {
  __shared__ A red[kWarps * 3 * KC];
  const int64_t n = blockIdx.x, d = p0.d, row = rows[n];
  const RowParams<A> p = adapter ? reft::slice(p0, adapter[n]) : p0;
  const int r = p.r;
  A* cn = coef + n * 3 * r;
  if (row < 0) {
    for (int k = threadIdx.x; k < 3 * r; k += kThreads) cn[k] = A(0);
    return;
  }
  const T* gr = grad + row * d;
  const T* hr = saved + n * d;
  for (int k0 = 0; k0 < r; k0 += KC) {
    A acc[3 * KC];  // [(P g')_k.., (W h)_k.., (P h)_k..]
#pragma unroll
    for (int i = 0; i < 3 * KC; ++i) acc[i] = A(0);
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const A g = static_cast<A>(gr[j]) * reft::keep_scale(p, row, j);
      const A h = static_cast<A>(hr[j]);
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        const int k = k0 + kk;
        if (k < r) {
          const A pk = p.P[k * d + j];
          acc[kk] += pk * g;
          if (p.has_weight) acc[KC + kk] += p.W[k * d + j] * h;
          if (p.subtract_proj) acc[2 * KC + kk] += pk * h;
        }
      }
    }
    block_sum<A, 3 * KC>(acc, red);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        const int k = k0 + kk;
        if (k < r) {
          cn[k] = reft::source_coeff(p, k, acc[KC + kk], acc[2 * KC + kk]);
          cn[r + k] = acc[kk];
          cn[2 * r + k] = reft::grad_coeff(p, k, acc[KC + kk], acc[kk]);
        }
      }
    }
  }
}

// Column pass for ranks [k_begin, k_begin + KM): block (x, c) handles columns x*kThreads.. of
// row chunk c (= part c % K of adapter c / K's entries; one adapter when order is null). Writes
// grad_h (when write_grad) and the chunk's partial weight gradients.
template <typename T, typename A, int KM>
__global__ void __launch_bounds__(kThreads)
    cols_kernel(T* __restrict__ grad, const int64_t* __restrict__ rows,
                const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                const T* __restrict__ saved, int64_t N, RowParams<A> p0, const A* __restrict__ coef,
                A* __restrict__ partial, int K, int k_begin, bool write_grad) {
  const int64_t d = p0.d, j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int r = p0.r, c = blockIdx.y, a = c / K, kc = c % K;
  const RowParams<A> p = order ? reft::slice(p0, a) : p0;
  const int64_t seg0 = order ? starts[a] : 0, cnt = (order ? starts[a + 1] : N) - seg0;
  const int64_t n0 = seg0 + cnt * kc / K, n1 = seg0 + cnt * (kc + 1) / K;
  const int64_t rd = static_cast<int64_t>(r) * d;
  A* part = partial + static_cast<int64_t>(c) * (2 * rd + 2 * r);
  if (j < d) {
    A accP[KM], accW[KM];
#pragma unroll
    for (int kk = 0; kk < KM; ++kk) accP[kk] = accW[kk] = A(0);
    for (int64_t m = n0; m < n1; ++m) {
      const int64_t n = order ? order[m] : m, row = rows[n];
      if (row < 0) continue;
      const A* s = coef + n * 3 * r;
      const A *u = s + r, *v = u + r;
      const A g = static_cast<A>(grad[row * d + j]) * reft::keep_scale(p, row, j);
      const A h = static_cast<A>(saved[n * d + j]);
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) {
        const int k = k_begin + kk;
        if (k < r) {
          accP[kk] += reft::grad_proj_elem(p, s[k], u[k], g, h);
          accW[kk] += v[k] * h;
        }
      }
      if (write_grad) grad[row * d + j] = static_cast<T>(reft::grad_h_elem(p, u, v, g, j));
    }
#pragma unroll
    for (int kk = 0; kk < KM; ++kk) {
      const int k = k_begin + kk;
      if (k < r) {
        part[k * d + j] = accP[kk];
        part[rd + k * d + j] = accW[kk];
      }
    }
  }
  if (blockIdx.x == 0 && k_begin == 0) {  // bias gradients of the chunk: sum v (or u), -sum u
    for (int k = threadIdx.x; k < r; k += kThreads) {
      A sb = A(0), sc = A(0);
      for (int64_t m = n0; m < n1; ++m) {
        const int64_t n = order ? order[m] : m;
        if (rows[n] < 0) continue;
        const A* cn = coef + n * 3 * r;
        sb += p.has_weight ? cn[2 * r + k] : cn[r + k];
        sc -= cn[r + k];
      }
      part[2 * rd + k] = sb;
      part[2 * rd + r + k] = sc;
    }
  }
}

// out[a, e] = sum_k partial[a * K + k, e], in chunk order (n_adapters = 1: out[e]).
template <typename A>
__global__ void sum_chunks(const A* __restrict__ partial, int K, int64_t E, int64_t n_adapters,
                           A* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= E * n_adapters) return;
  const int64_t a = i / E, e = i % E;
  A acc = A(0);
  for (int c = 0; c < K; ++c) acc += partial[(a * K + c) * E + e];
  out[i] = acc;
}

template <typename T, typename A>
cudaError_t forward_t(void* x, const int64_t* rows, const int64_t* adapter, void* saved, int64_t N,
                      const RowParams<A>& p, cudaStream_t st) {
  if (N == 0) return cudaSuccess;
  const size_t smem = sizeof(A) * p.r;
  T *xt = static_cast<T*>(x), *sv = static_cast<T*>(saved);
  if (p.r <= 4)
    forward_kernel<T, A, 4><<<static_cast<unsigned>(N), kThreads, smem, st>>>(xt, rows, adapter, sv, p);
  else
    forward_kernel<T, A, 8><<<static_cast<unsigned>(N), kThreads, smem, st>>>(xt, rows, adapter, sv, p);
  return cudaGetLastError();
}

template <typename T, typename A, int KM>
void launch_cols(T* g, const int64_t* rows, const int64_t* order, const int64_t* starts,
                 int64_t n_adapters, const T* sv, int64_t N, const RowParams<A>& p, const A* coef,
                 A* partial, int K, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((p.d + kThreads - 1) / kThreads),
                  static_cast<unsigned>(K * n_adapters));
  // Rank slices beyond the first only accumulate; the first (last launched) also writes grad_h,
  // which overwrites the upstream gradient the others read.
  for (int kb = ((p.r - 1) / KM) * KM; kb >= 0; kb -= KM)
    cols_kernel<T, A, KM><<<grid, kThreads, 0, st>>>(g, rows, order, starts, sv, N, p, coef, partial, K, kb,
                                                 kb == 0);
}

template <typename T, typename A>
cudaError_t backward_t(void* grad, const int64_t* rows, const int64_t* adapter, const int64_t* order,
                       const int64_t* starts, int64_t n_adapters, const void* saved, int64_t N,
                       const RowParams<A>& p, A* coef, A* partial, int K, A* out, cudaStream_t st) {
  const int64_t E = 2 * static_cast<int64_t>(p.r) * p.d + 2 * p.r;
  T* g = static_cast<T*>(grad);
  const T* sv = static_cast<const T*>(saved);
  if (N > 0) {
    const unsigned blocks = static_cast<unsigned>(N);
    if (p.r <= 4)
      coef_kernel<T, A, 4><<<blocks, kThreads, 0, st>>>(g, rows, adapter, sv, p, coef);
    else
      coef_kernel<T, A, 8><<<blocks, kThreads, 0, st>>>(g, rows, adapter, sv, p, coef);
    if (p.r <= 4)
      launch_cols<T, A, 4>(g, rows, order, starts, n_adapters, sv, N, p, coef, partial, K, st);
    else if (p.r <= 8)
      launch_cols<T, A, 8>(g, rows, order, starts, n_adapters, sv, N, p, coef, partial, K, st);
    else
      launch_cols<T, A, 16>(g, rows, order, starts, n_adapters, sv, N, p, coef, partial, K, st);
    sum_chunks<A><<<static_cast<unsigned>((E * n_adapters + kThreads - 1) / kThreads), kThreads, 0,
                    st>>>(partial, K, E, n_adapters, out);
  } else {
    cudaMemsetAsync(out, 0, sizeof(A) * E * n_adapters, st);
  }
  return cudaGetLastError();
}

}  // namespace

int backward_chunks(int64_t N, int64_t d, int sm_count) {
  const int64_t tiles = (d + kThreads - 1) / kThreads;
  int64_t K = (2 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  K = K < 256 ? K : 256;
  K = K < N ? K : N;
  return static_cast<int>(K > 1 ? K : 1);
}

namespace {
// dtype dispatch: fp32 compute for float/bf16/half storage, fp64 for double
template <typename A>
cudaError_t forward_dispatch(DType dt, void* x, const int64_t* rows, const int64_t* adapter,
                             void* saved, int64_t N, const RowParams<A>& p, cudaStream_t st) {
  if constexpr (std::is_same_v<A, double>) {
    if (dt != DType::kDouble) return cudaErrorInvalidValue;
    return forward_t<double, double>(x, rows, adapter, saved, N, p, st);
  } else {
    switch (dt) {
      case DType::kFloat: return forward_t<float, float>(x, rows, adapter, saved, N, p, st);
      case DType::kBFloat16: return forward_t<c10::BFloat16, float>(x, rows, adapter, saved, N, p, st);
      case DType::kHalf: return forward_t<c10::Half, float>(x, rows, adapter, saved, N, p, st);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <typename A>
cudaError_t backward_dispatch(DType dt, void* grad, const int64_t* rows, const int64_t* adapter,
                              const int64_t* order, const int64_t* starts, int64_t n_adapters,
                              const void* saved, int64_t N, const RowParams<A>& p, A* coef,
                              A* partial, int K, A* out, cudaStream_t st) {
#define REFT_BWD(T) backward_t<T, A>(grad, rows, adapter, order, starts, n_adapters, saved, N, p, \
                                     coef, partial, K, out, st)
  if constexpr (std::is_same_v<A, double>) {
    if (dt != DType::kDouble) return cudaErrorInvalidValue;
    return REFT_BWD(double);
  } else {
    switch (dt) {
      case DType::kFloat: return REFT_BWD(float);
      case DType::kBFloat16: return REFT_BWD(c10::BFloat16);
      case DType::kHalf: return REFT_BWD(c10::Half);
      default: return cudaErrorInvalidValue;
    }
  }
#undef REFT_BWD
}
}  // namespace

#define REFT_LAUNCHERS(A)                                                                        \
  cudaError_t forward(DType dt, void* x, const int64_t* rows, const int64_t* adapter, void* saved, \
                      int64_t N, const RowParams<A>& p, cudaStream_t st) {                       \
    return forward_dispatch<A>(dt, x, rows, adapter, saved, N, p, st);                           \
  }                                                                                              \
  cudaError_t backward(DType dt, void* grad, const int64_t* rows, const int64_t* adapter,        \
                       const int64_t* order, const int64_t* starts, int64_t n_adapters,          \
                       const void* saved, int64_t N, const RowParams<A>& p, A* coef, A* partial, \
                       int K, A* out, cudaStream_t st) {                                         \
    return backward_dispatch<A>(dt, grad, rows, adapter, order, starts, n_adapters, saved, N, p,  \
                                coef, partial, K, out, st);                                      \
  }
REFT_LAUNCHERS(float)
REFT_LAUNCHERS(double)
#undef REFT_LAUNCHERS

}  // namespace reft_cuda
