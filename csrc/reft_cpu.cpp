// CPU backend of the ReFT op family, one adapter per call (math: reft_rows.h; the row functions:
// reft_cpu_rows.h; per-row adapters: reft_cpu_multi.cpp).
//
// forward / grad_h: OpenMP over the selected rows, one row per iteration.
//
// Weight gradients: the rows are split into C = min(threads, N) contiguous chunks; chunk c sums
// its rows, in order, into its own partial buffer (C x (2 r d + 2 r), not N x r x d), and the
// partials are added in chunk order. The result is deterministic for a given thread count.
#include "reft_cpu_rows.h"

namespace reft {
namespace {
// Edit x (M, d) in place at rows[n] >= 0; saved[n] = the pre-edit row (zeros for skipped entries).
template <typename T, typename A>
void forward_cpu(T* x, const int64_t* rows, T* saved, int64_t N, const RowParams<A>& p) {
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
      else row_fn(x + row * d, sv, row, p, hbuf.data(), obuf.data(), sbuf.data());
    }
  }
}

// Overwrite g (M, d) with grad_h at rows[n] >= 0 and write the weight gradients to
// out = [grad_P (r d) | grad_W (r d) | grad_b (r) | grad_c (r)].
template <typename T, typename A>
void backward_cpu(T* g2d, const int64_t* rows, const T* saved, int64_t N, const RowParams<A>& p,
                  A* out) {
  const int64_t d = p.d, rd = p.r * d, E = 2 * rd + 2 * p.r;
  const int r = p.r, C = num_chunks(N);
  auto row_fn = &backward_row_base<T, A>;
#ifdef REFT_HAS_AVX2_PATH
  if (use_avx2()) row_fn = &backward_row_avx2<T, A>;
#endif
  std::vector<A> part(static_cast<size_t>(C) * E, A(0));
#pragma omp parallel num_threads(C)
  {
    std::vector<A> gbuf(d), hbuf(d), coef(3 * r);
    for (int c = omp_get_thread_num(); c < C; c += omp_get_num_threads()) {
      A* gP = part.data() + c * E;  // chunk c's partial: rows N*c/C .. N*(c+1)/C, in order
      for (int64_t n = N * c / C; n < N * (c + 1) / C; ++n) {
        if (rows[n] >= 0)
          row_fn(g2d + rows[n] * d, saved + n * d, rows[n], p, gbuf.data(), hbuf.data(),
                 coef.data(), gP, gP + rd, gP + 2 * rd, gP + 2 * rd + r);
      }
    }
  }
  // Second pass: add the chunk partials in chunk order.
  at::parallel_for(0, E, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) out[e] = part[e];
    for (int c = 1; c < C; ++c) {
      const A* pc = part.data() + c * E;
      REFT_SIMD
      for (int64_t e = e0; e < e1; ++e) out[e] += pc[e];
    }
  });
}

at::Tensor forward_rows(at::Tensor x2d, at::Tensor rows, at::Tensor proj,
                        std::optional<at::Tensor> weight, at::Tensor bias,
                        std::optional<at::Tensor> proj_bias, bool has_weight, bool subtract_proj,
                        int64_t act, double p, int64_t seed) {
  check_rows_args(x2d, rows, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  TORCH_CHECK(x2d.device().is_cpu(), "reft native cpu: x2d must be on the CPU");
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "reft_forward_rows", [&] {
    using A = at::opmath_type<scalar_t>;
    Weights w;
    const auto rp = make_params<A>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj,
                                   act, p, seed);
    forward_cpu<scalar_t, A>(x2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                             saved.data_ptr<scalar_t>(), N, rp);
  });
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows(
    at::Tensor grad2d, at::Tensor rows, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  check_rows_args(grad2d, rows, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  TORCH_CHECK(grad2d.device().is_cpu(), "reft native cpu: grad2d must be on the CPU");
  const int64_t N = rows.numel(), d = grad2d.size(1), r = proj.size(0);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, d}) && saved.scalar_type() == grad2d.scalar_type(),
              "reft native cpu: saved must be (N, d) in grad2d's dtype");
  auto sv = saved.contiguous();
  auto out = at::zeros({2 * r * d + 2 * r}, grad2d.options().dtype(compute_dtype(grad2d)));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad2d.scalar_type(), "reft_backward_rows", [&] {
      using A = at::opmath_type<scalar_t>;
      Weights w;
      const auto rp = make_params<A>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                     subtract_proj, act, p, seed);
      backward_cpu<scalar_t, A>(grad2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                sv.data_ptr<scalar_t>(), N, rp, out.data_ptr<A>());
    });
  }
  return split_grads(out, r, d, has_weight, subtract_proj && proj_bias.has_value() && proj_bias->defined());
}

}  // namespace

// reft_cpu_multi.cpp: per-row adapters over stacked (A, r, d) weights.
at::Tensor forward_rows_multi(at::Tensor x2d, at::Tensor rows, at::Tensor adapter, at::Tensor proj,
                              std::optional<at::Tensor> weight, at::Tensor bias,
                              std::optional<at::Tensor> proj_bias, bool has_weight,
                              bool subtract_proj, int64_t act, double p, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows_multi(
    at::Tensor grad2d, at::Tensor rows, at::Tensor adapter, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed);
}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reft_kernels native CPU backend (csrc/reft_cpu.cpp)";
  m.def("forward_rows", &reft::forward_rows, "edit x2d in place at rows; returns the pre-edit rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_rows", &reft::backward_rows,
        "overwrite grad2d with grad_h at rows; returns (grad_proj, grad_weight, grad_bias, grad_proj_bias)",
        py::call_guard<py::gil_scoped_release>());
  m.def("forward_rows_multi", &reft::forward_rows_multi,
        "per-row adapters: edit x2d in place at rows, entry n with adapter[n]; returns the pre-edit rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_rows_multi", &reft::backward_rows_multi,
        "per-row adapters: overwrite grad2d with grad_h at rows; returns the stacked weight gradients",
        py::call_guard<py::gil_scoped_release>());
}
