// Per-row math of the ReFT op family, shared by the CPU (reft_cpu.cpp) and CUDA (reft_cuda.cu)
// backends. Plain C++ templates, `__host__ __device__` under nvcc; no torch dependency.
//
// Every variant edits a selected hidden row h (width d) as            (reft_kernels/ops/variants.py)
//
//     s      = A(h) - C(h)                       (an r-vector)
//     A(h)   = act(W h + b)   if has_weight       (LoReFT, NoReFT, DiReFT, NodiReFT)
//            = b              otherwise           (ConsReFT, LobiReFT)
//     C(h)   = P h (+ c)      if subtract_proj    (LoReFT, NoReFT, ConsReFT; c only NoReFT)
//            = 0              otherwise
//     Phi(h) = keep / (1 - p) * (h + P^T s)       (dropout on the whole edited row)
//
// and, with g the upstream gradient of the row and g' = g * keep / (1 - p):
//
//     u      = P g'                 v = u * act'(W h + b)           (r-vectors)
//     grad_h = g' + W^T v - [C] P^T u
//     grad_P += s g'^T - [C] u h^T  grad_W += v h^T
//     grad_b += v (with W) or u     grad_c += -u
//
// A row is processed in two phases: (1) r-vector dot products over the row (W h, P h, P g'),
// turned into the coefficients s, u, v by `source_coeffs` / `grad_coeffs`; (2) an elementwise
// pass over the row (`edit_elem`, `grad_h_elem`, the weight-gradient updates). The backends
// only differ in how they split these loops over threads.
//
// T is the storage dtype of hidden (float, double, c10::BFloat16, c10::Half), A the compute
// dtype (float; double for double inputs). Weights are passed already converted to A.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define REFT_HD __host__ __device__ __forceinline__
#else
#define REFT_HD inline
#endif

// `#pragma omp simd` for the host compiler (a no-op under nvcc or without OpenMP).
#if defined(_OPENMP) && !defined(__CUDACC__)
#define REFT_PRAGMA(x) _Pragma(#x)
#define REFT_SIMD REFT_PRAGMA(omp simd)
#define REFT_SIMD_SUM(v) REFT_PRAGMA(omp simd reduction(+ : v))
#else
#define REFT_SIMD
#define REFT_SIMD_SUM(v)
#endif
#if defined(__CUDACC__)
#define REFT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define REFT_UNROLL _Pragma("GCC unroll 10")
#else
#define REFT_UNROLL
#endif

namespace reft {

// Activation ids, as family.ACT_IDS.
enum Act : int { kLinear = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4, kSigmoid = 5 };

REFT_HD float m_exp(float x) { return expf(x); }
REFT_HD double m_exp(double x) { return exp(x); }
REFT_HD float m_erf(float x) { return erff(x); }
REFT_HD double m_erf(double x) { return erf(x); }
REFT_HD float m_tanh(float x) { return tanhf(x); }
REFT_HD double m_tanh(double x) { return tanh(x); }

template <typename A> REFT_HD A sigmoid(A z) { return A(1) / (A(1) + m_exp(-z)); }

// act(z); gelu is the exact (erf) one.
template <typename A> REFT_HD A act_fwd(int act, A z) {
  switch (act) {
    case kRelu: return z > A(0) ? z : A(0);
    case kGelu: return A(0.5) * z * (A(1) + m_erf(z * A(0.7071067811865476)));
    case kSilu: return z * sigmoid(z);
    case kTanh: return m_tanh(z);
    case kSigmoid: return sigmoid(z);
    default: return z;
  }
}

// d act(z) / dz.
template <typename A> REFT_HD A act_grad(int act, A z) {
  switch (act) {
    case kRelu: return z > A(0) ? A(1) : A(0);
    case kGelu: {  // Phi(z) + z phi(z)
      A cdf = A(0.5) * (A(1) + m_erf(z * A(0.7071067811865476)));
      return cdf + z * m_exp(A(-0.5) * z * z) * A(0.3989422804014327);
    }
    case kSilu: { A sg = sigmoid(z); return sg * (A(1) + z * (A(1) - sg)); }
    case kTanh: { A t = m_tanh(z); return A(1) - t * t; }
    case kSigmoid: { A sg = sigmoid(z); return sg * (A(1) - sg); }
    default: return A(1);
  }
}

// ------------------------------------------------------------------------------------------
// Dropout RNG: Philox4x32-10, bit-identical to triton.language.randint(seed, offset) and to
// family.philox_randint. Counter (c0, c1, c2, c3) = (offset lo32, offset hi32, 0, 0),
// key (k0, k1) = (seed lo32, seed hi32); the result is c0 after 10 rounds.
// ------------------------------------------------------------------------------------------
REFT_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t c0 = (uint32_t)offset, c1 = (uint32_t)(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  REFT_UNROLL
  for (int i = 0; i < 10; ++i) {
    uint64_t pb = (uint64_t)0xCD9E8D57u * c2;  // ROUND_B * c2
    uint64_t pa = (uint64_t)0xD2511F53u * c0;  // ROUND_A * c0
    uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// ------------------------------------------------------------------------------------------
// Everything the row math needs. P, W: (r, d) row-major; b, c: (r,); W and c may be null.
// ------------------------------------------------------------------------------------------
template <typename A> struct RowParams {
  const A* P;
  const A* W;
  const A* b;
  const A* c;
  int r;
  int64_t d;
  int act;             // activation id (only used with W)
  bool has_weight;     // A(h) = act(W h + b), else b
  bool subtract_proj;  // C(h) = P h (+ c)
  bool dropout;        // p > 0
  uint64_t seed;
  uint32_t threshold;  // floor(p * 2^24): keep iff (philox >> 8) >= threshold
  A scale;             // 1 / (1 - p)
};

// Per-row adapters (reft_kernels/ops/variants.py): A adapters stacked as P, W (A, r, d) and b, c
// (A, r); adapter a's slice, as a single-adapter RowParams (p points at adapter 0).
template <typename A> REFT_HD RowParams<A> slice(const RowParams<A>& p, int64_t a) {
  RowParams<A> q = p;
  const int64_t rd = static_cast<int64_t>(p.r) * p.d;
  q.P = p.P + a * rd;
  if (p.W) q.W = p.W + a * rd;
  q.b = p.b + a * p.r;
  if (p.c) q.c = p.c + a * p.r;
  return q;
}

// keep / (1 - p) for the Philox offset row * d + col: scale if (philox >> 8) >= threshold, else 0.
template <typename A>
REFT_HD A dropout_factor(uint64_t seed, uint64_t offset, uint32_t threshold, A scale) {
  return (philox_randint(seed, offset) >> 8) >= threshold ? scale : A(0);
}

// The dropout factor of element (row, col): a pure function of (seed, row, col), 1 without dropout.
template <typename A> REFT_HD A keep_scale(const RowParams<A>& p, int64_t row, int64_t col) {
  if (!p.dropout) return A(1);
  return dropout_factor(p.seed, (uint64_t)(row * p.d + col), p.threshold, p.scale);
}

// Forward coefficients s_k = A_k - C_k from the dot products wh_k = (W h)_k and ph_k = (P h)_k.
template <typename A> REFT_HD A source_coeff(const RowParams<A>& p, int k, A wh, A ph) {
  A s = p.has_weight ? act_fwd(p.act, wh + p.b[k]) : p.b[k];
  if (p.subtract_proj) s -= ph + (p.c ? p.c[k] : A(0));
  return s;
}

// Backward coefficient v_k = u_k * act'(W h + b)_k (variants with W; u_k = (P g')_k).
template <typename A> REFT_HD A grad_coeff(const RowParams<A>& p, int k, A wh, A u) {
  return p.has_weight ? u * act_grad(p.act, wh + p.b[k]) : A(0);
}

// Forward output element j before dropout: h_j + sum_k s_k P_kj.
template <typename A> REFT_HD A edit_elem(const RowParams<A>& p, const A* s, A hj, int64_t j) {
  A o = hj;
  for (int k = 0; k < p.r; ++k) o += s[k] * p.P[k * p.d + j];
  return o;
}

// grad_h element j: g'_j + sum_k v_k W_kj - [C] u_k P_kj.
template <typename A>
REFT_HD A grad_h_elem(const RowParams<A>& p, const A* u, const A* v, A gj, int64_t j) {
  A o = gj;
  for (int k = 0; k < p.r; ++k) {
    if (p.has_weight) o += v[k] * p.W[k * p.d + j];
    if (p.subtract_proj) o -= u[k] * p.P[k * p.d + j];
  }
  return o;
}

// Per-row contribution to the weight gradients at column j, for rank k:
//   grad_P[k, j] += s_k g'_j - [C] u_k h_j        grad_W[k, j] += v_k h_j
template <typename A> REFT_HD A grad_proj_elem(const RowParams<A>& p, A s, A u, A gj, A hj) {
  return p.subtract_proj ? s * gj - u * hj : s * gj;
}

}  // namespace reft
