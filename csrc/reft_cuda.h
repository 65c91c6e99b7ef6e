// Torch-free launchers of the CUDA backend (reft_cuda.cu); the torch binding is reft_cuda_binding.cpp.
// Pointers are raw device pointers; T* arguments point at `dtype` elements, A at float (double
// for kDouble). All launches are asynchronous on `stream`; the return value is the launch status.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "reft_rows.h"

namespace reft_cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// Number of row chunks K of the weight-gradient reduction (the partial buffer is K x E per adapter).
int backward_chunks(int64_t N, int64_t d, int sm_count);

// p points at the stacked P, W (A, r, d) and b, c (A, r); entry n uses adapter[n]'s slice
// (adapter null: every entry uses adapter 0, the single-adapter case).
//
// forward: edit x (M, d) in place at rows[n] >= 0 (n < N); saved[n] = pre-edit row (zeros for
// rows[n] < 0).
cudaError_t forward(DType dtype, void* x, const int64_t* rows, const int64_t* adapter, void* saved,
                    int64_t N, const reft::RowParams<float>& p, cudaStream_t stream);
cudaError_t forward(DType dtype, void* x, const int64_t* rows, const int64_t* adapter, void* saved,
                    int64_t N, const reft::RowParams<double>& p, cudaStream_t stream);

// backward: overwrite grad (M, d) with grad_h at rows[n] >= 0 and write out (A, E), each
// adapter's row [grad_P (r d) | grad_W (r d) | grad_b (r) | grad_c (r)] (E = 2 r d + 2 r).
// With A > 1 it takes the live entries ordered by adapter (order (N,), adapter a's entries at
// order[starts[a] .. starts[a+1])); with A = 1 order, starts and adapter may be null.
// Workspace: coef (N x 3 x r), partial (A x K x E).
cudaError_t backward(DType dtype, void* grad, const int64_t* rows, const int64_t* adapter,
                     const int64_t* order, const int64_t* starts, int64_t n_adapters,
                     const void* saved, int64_t N, const reft::RowParams<float>& p, float* coef,
                     float* partial, int K, float* out, cudaStream_t stream);
cudaError_t backward(DType dtype, void* grad, const int64_t* rows, const int64_t* adapter,
                     const int64_t* order, const int64_t* starts, int64_t n_adapters,
                     const void* saved, int64_t N, const reft::RowParams<double>& p, double* coef,
                     double* partial, int K, double* out, cudaStream_t stream);

}  // namespace reft_cuda
