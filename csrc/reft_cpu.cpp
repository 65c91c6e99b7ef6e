// CPU backend of the ReFT op (reft_kernels/ops/autograd.py's launcher contract): A adapters
// stacked as P, W (A, r, d) and b, c (A, r); entry n of the flat rows is edited with adapter
// adapter[n]'s slice (one adapter: A = 1). Math per row: reft_rows.h.
//
// Rows: within a row every loop is unit-stride over d (`#pragma omp simd`): r dot products, then
// rank-outer axpys (the elementwise formulas of reft_rows.h reordered so they vectorise). A row
// is converted once to the compute dtype into a per-thread buffer and stays in L1 between the
// passes. The row functions are compiled for the baseline ISA and for AVX2+FMA, chosen at run
// time.
//
// forward / grad_h: OpenMP over the entries, one row per iteration, with the row's slice.
//
// Weight gradients (deterministic for a given thread count, no atomics): the live entries are
// ordered by adapter with a stable counting sort (O(N + A)), and that order is split into
// C = min(threads, N) contiguous chunks. A chunk walks its entries in order and sums each run of
// one adapter (a "segment") into its own partial buffer of 2 r d + 2 r values; a chunk has at
// most (adapters it touches) segments, so the partials total at most (C + A - 1) slices, never
// N x r x d. The segments are then added into the stacked gradients in chunk order.
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

template <typename T, typename A>
void forward_cpu(T* x, const int64_t* rows, const int64_t* adapter, T* saved, int64_t N,
                       const RowParams<A>& p) {
  const int64_t d = p.d;
  auto row_fn = &forward_row_base<T, A>;
#ifdef REFT_HAS_AVX2_PATH
  if (use_avx2()) row_fn = &forward_row_avx2<T, A>;
#endif
#pragma omp parallel num_threads(num_chunks(N))
  {
    std::vector<A> hbuf(d), obuf(d), sbuf(p.r);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = rows[n];
      T* sv = saved + n * d;
      if (row < 0) std::fill(sv, sv + d, T(0));
      else row_fn(x + row * d, sv, row, reft::slice(p, adapter[n]), hbuf.data(), obuf.data(), sbuf.data());
    }
  }
}

// Live entries (rows >= 0) ordered by adapter, stable; returns their count.
int64_t order_by_adapter(const int64_t* rows, const int64_t* adapter, int64_t N, int64_t n_adapters,
                         std::vector<int64_t>& order) {
  std::vector<int64_t> start(n_adapters + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    if (rows[n] < 0) continue;
    TORCH_CHECK(adapter[n] >= 0 && adapter[n] < n_adapters, "reft native cpu: adapter index ",
                adapter[n], " outside [0, ", n_adapters, ")");
    ++start[adapter[n] + 1];
  }
  for (int64_t a = 0; a < n_adapters; ++a) start[a + 1] += start[a];
  order.assign(start[n_adapters], 0);
  for (int64_t n = 0; n < N; ++n)
    if (rows[n] >= 0) order[start[adapter[n]]++] = n;
  return static_cast<int64_t>(order.size());
}

// Overwrite g (M, d) with grad_h at rows[n] >= 0 and write the stacked weight gradients to
// out (A, E) (zero-initialised), each adapter's row [grad_P (r d) | grad_W (r d) | grad_b (r) | grad_c (r)].
template <typename T, typename A>
void backward_cpu(T* g2d, const int64_t* rows, const int64_t* adapter, const T* saved,
                        int64_t N, int64_t n_adapters, const RowParams<A>& p, A* out) {
  const int64_t d = p.d, rd = p.r * d, E = 2 * rd + 2 * p.r;
  const int r = p.r;
  std::vector<int64_t> order;
  const int64_t L = order_by_adapter(rows, adapter, N, n_adapters, order);
  if (L == 0) return;
  const int C = num_chunks(L);
  auto row_fn = &backward_row_base<T, A>;
#ifdef REFT_HAS_AVX2_PATH
  if (use_avx2()) row_fn = &backward_row_avx2<T, A>;
#endif
  std::vector<std::vector<int64_t>> seg_adapter(C);  // chunk c's segments: their adapters
  std::vector<std::vector<A>> seg_sum(C);            // and their partial sums, E values each
#pragma omp parallel num_threads(C)
  {
    std::vector<A> gbuf(d), hbuf(d), coef(3 * r);
    for (int c = omp_get_thread_num(); c < C; c += omp_get_num_threads()) {
      auto& ids = seg_adapter[c];
      auto& sums = seg_sum[c];
      for (int64_t m = L * c / C; m < L * (c + 1) / C; ++m) {
        const int64_t n = order[m], a = adapter[n];
        if (ids.empty() || ids.back() != a) {
          ids.push_back(a);
          sums.resize(sums.size() + E, A(0));
        }
        A* gP = sums.data() + sums.size() - E;
        row_fn(g2d + rows[n] * d, saved + n * d, rows[n], reft::slice(p, a), gbuf.data(), hbuf.data(),
               coef.data(), gP, gP + rd, gP + 2 * rd, gP + 2 * rd + r);
      }
    }
  }
  // Ordered reduction of the segments into their adapter's E values, parallel over columns.
  at::parallel_for(0, E, 4096, [&](int64_t e0, int64_t e1) {
    for (int c = 0; c < C; ++c) {
      for (size_t s = 0; s < seg_adapter[c].size(); ++s) {
        const A* src = seg_sum[c].data() + s * E;
        A* dst = out + seg_adapter[c][s] * E;
        REFT_SIMD
        for (int64_t e = e0; e < e1; ++e) dst[e] += src[e];
      }
    }
  });
}

}  // namespace

at::Tensor forward_rows(at::Tensor x2d, at::Tensor rows, at::Tensor adapter, at::Tensor proj,
                        std::optional<at::Tensor> weight, at::Tensor bias,
                        std::optional<at::Tensor> proj_bias, bool has_weight, bool subtract_proj,
                        int64_t act, double p, int64_t seed) {
  TORCH_CHECK(x2d.device().is_cpu(), "reft native cpu: x2d must be on the CPU");
  check_rows_args(x2d, rows, adapter, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "reft_forward_rows", [&] {
    using A = at::opmath_type<scalar_t>;
    Weights w;
    const auto rp = make_params<A>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj,
                                   act, p, seed);
    forward_cpu<scalar_t, A>(x2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                             adapter.data_ptr<int64_t>(), saved.data_ptr<scalar_t>(), N, rp);
  });
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows(
    at::Tensor grad2d, at::Tensor rows, at::Tensor adapter, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  TORCH_CHECK(grad2d.device().is_cpu(), "reft native cpu: grad2d must be on the CPU");
  check_rows_args(grad2d, rows, adapter, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const int64_t N = rows.numel(), d = grad2d.size(1), nA = proj.size(0), r = proj.size(1);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, d}) && saved.scalar_type() == grad2d.scalar_type(),
              "reft native cpu: saved must be (N, d) in grad2d's dtype");
  auto sv = saved.contiguous();
  auto out = at::zeros({nA * (2 * r * d + 2 * r)}, grad2d.options().dtype(compute_dtype(grad2d)));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad2d.scalar_type(), "reft_backward_rows", [&] {
      using A = at::opmath_type<scalar_t>;
      Weights w;
      const auto rp = make_params<A>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                     subtract_proj, act, p, seed);
      backward_cpu<scalar_t, A>(grad2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                adapter.data_ptr<int64_t>(), sv.data_ptr<scalar_t>(), N, nA, rp,
                                out.data_ptr<A>());
    });
  }
  return split_grads(out, nA, r, d, has_weight, subtract_proj && proj_bias.has_value() && proj_bias->defined());
}

}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reft_kernels native CPU backend (csrc/reft_cpu.cpp)";
  m.def("forward_rows", &reft::forward_rows,
        "edit x2d in place at rows, entry n with adapter[n]; returns the pre-edit rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_rows", &reft::backward_rows,
        "overwrite grad2d with grad_h at rows; returns the stacked (grad_proj, grad_weight, grad_bias, grad_proj_bias)",
        py::call_guard<py::gil_scoped_release>());
}
