// CPU row functions of the ReFT op family, shared by reft_cpu.cpp (one adapter) and
// reft_cpu_multi.cpp (per-row adapters). Math: reft_rows.h. Each TU gets its own copy (the
// functions live in an anonymous namespace).
//
// Within a row every loop is unit-stride over d (`#pragma omp simd`): r dot products, then
// rank-outer axpys (the elementwise formulas of reft_rows.h reordered so they vectorise). A row
// is converted once to the compute dtype into a per-thread buffer and stays in L1 between the
// passes. The row functions are compiled for the baseline ISA and for AVX2+FMA, chosen at run
// time.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "reft_binding.h"

namespace reft {
namespace {

#define REFT_INLINE inline __attribute__((always_inline))

template <typename A> REFT_INLINE A dot(const A* a, const A* b, int64_t d) {
  A acc = A(0);
  REFT_SIMD_SUM(acc)
  for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];
  return acc;
}

// y += a * x over d elements.
template <typename A> REFT_INLINE void axpy(A* y, A a, const A* x, int64_t d) {
  REFT_SIMD
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}

// y[j] = x[j] (* the dropout factor of (row, j)), converting between storage and compute dtypes.
template <typename Y, typename X, typename A>
REFT_INLINE void copy_row(Y* y, const X* x, const RowParams<A>& p, int64_t row, bool dropout) {
  const int64_t d = p.d;
  if (dropout) {
    const uint64_t base = static_cast<uint64_t>(row * d);
    REFT_SIMD
    for (int64_t j = 0; j < d; ++j)
      y[j] = static_cast<Y>(static_cast<A>(x[j]) *
                            dropout_factor(p.seed, base + j, p.threshold, p.scale));
  } else {
    REFT_SIMD
    for (int64_t j = 0; j < d; ++j) y[j] = static_cast<Y>(static_cast<A>(x[j]));
  }
}

// A row of storage dtype T in the compute dtype A: the row itself when T == A, else a copy in buf.
template <typename T, typename A> REFT_INLINE const A* as_compute(const T* x, A* buf, int64_t d) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    REFT_SIMD
    for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<A>(x[j]);
    return buf;
  }
}

// One forward row: xr <- dropout(h + P^T s), sv <- h. obuf: d scratch values.
template <typename T, typename A>
REFT_INLINE void forward_row(T* xr, T* sv, int64_t row, const RowParams<A>& p, A* hbuf, A* obuf,
                             A* s) {
  const int64_t d = p.d;
  std::copy(xr, xr + d, sv);
  const A* h = as_compute(sv, hbuf, d);  // never aliases xr, which is rewritten below
  for (int k = 0; k < p.r; ++k) {
    const A wh = p.has_weight ? dot(p.W + k * d, h, d) : A(0);
    const A ph = p.subtract_proj ? dot(p.P + k * d, h, d) : A(0);
    s[k] = source_coeff(p, k, wh, ph);
  }
  // o = h + sum_k s_k P_k (k-outer, unit stride), then dropout and the store in T
  A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(xr) : obuf;  // xr already holds h if T == A
  if (!std::is_same_v<T, A>) copy_row<A, A, A>(o, h, p, row, false);
  for (int k = 0; k < p.r; ++k) axpy(o, s[k], p.P + k * d, d);
  if (p.dropout || !std::is_same_v<T, A>) copy_row<T, A, A>(xr, o, p, row, p.dropout);
}

// One backward row: weight-gradient partials += this row's terms, then gr <- grad_h.
template <typename T, typename A>
REFT_INLINE void backward_row(T* gr, const T* svr, int64_t row, const RowParams<A>& p, A* gbuf,
                              A* hbuf, A* s, A* gP, A* gW, A* gb, A* gc) {
  const int64_t d = p.d;
  const int r = p.r;
  A *u = s + r, *v = u + r;
  const A* g = gbuf;  // g' = g * keep / (1 - p)
  if (std::is_same_v<T, A> && !p.dropout) g = reinterpret_cast<const A*>(gr);
  else copy_row<A, T, A>(gbuf, gr, p, row, p.dropout);
  const A* h = as_compute(svr, hbuf, d);
  for (int k = 0; k < r; ++k) {  // u = P g', s = A(h) - C(h), v = u * act'(W h + b)
    u[k] = dot(p.P + k * d, g, d);
    const A wh = p.has_weight ? dot(p.W + k * d, h, d) : A(0);
    const A ph = p.subtract_proj ? dot(p.P + k * d, h, d) : A(0);
    s[k] = source_coeff(p, k, wh, ph);
    v[k] = grad_coeff(p, k, wh, u[k]);
  }
  for (int k = 0; k < r; ++k) {  // grad_P += s g'^T - [C] u h^T, grad_W += v h^T
    A* gPk = gP + k * d;
    const A sk = s[k], uk = u[k], vk = v[k];
    if (p.subtract_proj) {
      REFT_SIMD
      for (int64_t j = 0; j < d; ++j) gPk[j] += sk * g[j] - uk * h[j];
    } else {
      axpy(gPk, sk, g, d);
    }
    if (p.has_weight) axpy(gW + k * d, vk, h, d);
    gb[k] += p.has_weight ? vk : uk;
    gc[k] -= uk;
  }
  // grad_h = g' + sum_k v_k W_k - [C] u_k P_k, accumulated in place (gr when T == A)
  A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(gr) : gbuf;
  if (o != g) copy_row<A, A, A>(o, g, p, row, false);
  for (int k = 0; k < r; ++k) {
    if (p.has_weight) axpy(o, v[k], p.W + k * d, d);
    if (p.subtract_proj) axpy(o, -u[k], p.P + k * d, d);
  }
  if (!std::is_same_v<T, A>) copy_row<T, A, A>(gr, o, p, row, false);
}

// The row functions compiled twice: for the baseline ISA and, on x86-64, for AVX2+FMA, picked at
// run time (no -march=native: the build stays portable across CI and user machines).
#define REFT_ROW_WRAPPERS(SUFFIX, ATTR)                                                        \
  template <typename T, typename A>                                                            \
  ATTR void forward_row_##SUFFIX(T* xr, T* sv, int64_t row, const RowParams<A>& p, A* hb,      \
                                 A* ob, A* s) {                                                \
    forward_row<T, A>(xr, sv, row, p, hb, ob, s);                                              \
  }                                                                                            \
  template <typename T, typename A>                                                            \
  ATTR void backward_row_##SUFFIX(T* gr, const T* sv, int64_t row, const RowParams<A>& p,      \
                                  A* gbuf, A* hb, A* s, A* gP, A* gW, A* gb, A* gc) {          \
    backward_row<T, A>(gr, sv, row, p, gbuf, hb, s, gP, gW, gb, gc);                           \
  }
REFT_ROW_WRAPPERS(base, )
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REFT_HAS_AVX2_PATH 1
REFT_ROW_WRAPPERS(avx2, __attribute__((target("avx2,fma"))))
inline bool use_avx2() {  // REFT_KERNELS_NO_AVX2=1 forces the baseline path (tests use it)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("REFT_KERNELS_NO_AVX2") && std::getenv("REFT_KERNELS_NO_AVX2")[0] &&
                           std::string(std::getenv("REFT_KERNELS_NO_AVX2")) != "0");
  return ok;
}
#endif

inline int num_chunks(int64_t N) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N)));
}

}  // namespace
}  // namespace reft
