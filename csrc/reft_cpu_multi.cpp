// CPU backend of the per-row adapter op (reft_kernels/ops/multi.py): A adapters stacked as
// P, W (A, r, d) and b, c (A, r); entry n of the flat rows is edited with adapter adapter[n]'s
// slice. Math per row: reft_rows.h; row functions: reft_cpu_rows.h (shared with reft_cpu.cpp, so
// a row costs the same whichever adapter it uses).
//
// forward / grad_h: OpenMP over the entries, one row per iteration, with the row's slice.
//
// Weight gradients (deterministic for a given thread count, no atomics): the live entries are
// ordered by adapter with a stable counting sort (O(N + A)), and that order is split into
// C = min(threads, N) contiguous chunks. A chunk walks its entries in order and sums each run of
// one adapter (a "segment") into its own partial buffer of 2 r d + 2 r values; a chunk has at
// most (adapters it touches) segments, so the partials total at most (C + A - 1) slices, never
// N x r x d. The segments are then added into the stacked gradients in chunk order.
#include "reft_cpu_rows.h"

namespace reft {
namespace {

template <typename T, typename A>
void forward_multi_cpu(T* x, const int64_t* rows, const int64_t* adapter, T* saved, int64_t N,
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
// out = [grad_P (A r d) | grad_W (A r d) | grad_b (A r) | grad_c (A r)] (zero-initialised).
template <typename T, typename A>
void backward_multi_cpu(T* g2d, const int64_t* rows, const int64_t* adapter, const T* saved,
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
  // Ordered reduction over the four parts of a segment's E values, parallel over columns.
  const int64_t part_len[4] = {rd, rd, r, r};
  const int64_t part_src[4] = {0, rd, 2 * rd, 2 * rd + r};
  const int64_t part_dst[4] = {0, n_adapters * rd, 2 * n_adapters * rd, 2 * n_adapters * rd + n_adapters * r};
  for (int q = 0; q < 4; ++q) {
    const int64_t len = part_len[q];
    at::parallel_for(0, len, 4096, [&](int64_t e0, int64_t e1) {
      for (int c = 0; c < C; ++c) {
        for (size_t s = 0; s < seg_adapter[c].size(); ++s) {
          const A* src = seg_sum[c].data() + s * E + part_src[q];
          A* dst = out + part_dst[q] + seg_adapter[c][s] * len;
          REFT_SIMD
          for (int64_t e = e0; e < e1; ++e) dst[e] += src[e];
        }
      }
    });
  }
}


}  // namespace

at::Tensor forward_rows_multi(at::Tensor x2d, at::Tensor rows, at::Tensor adapter, at::Tensor proj,
                              std::optional<at::Tensor> weight, at::Tensor bias,
                              std::optional<at::Tensor> proj_bias, bool has_weight,
                              bool subtract_proj, int64_t act, double p, int64_t seed) {
  TORCH_CHECK(x2d.device().is_cpu(), "reft native cpu: x2d must be on the CPU");
  check_multi_args(x2d, rows, adapter, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "reft_forward_rows_multi", [&] {
    using A = at::opmath_type<scalar_t>;
    Weights w;
    auto rp = make_params<A>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj, act, p, seed);
    rp.r = static_cast<int>(proj.size(1));
    forward_multi_cpu<scalar_t, A>(x2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                   adapter.data_ptr<int64_t>(), saved.data_ptr<scalar_t>(), N, rp);
  });
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows_multi(
    at::Tensor grad2d, at::Tensor rows, at::Tensor adapter, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  TORCH_CHECK(grad2d.device().is_cpu(), "reft native cpu: grad2d must be on the CPU");
  check_multi_args(grad2d, rows, adapter, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const int64_t N = rows.numel(), d = grad2d.size(1), nA = proj.size(0), r = proj.size(1);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, d}) && saved.scalar_type() == grad2d.scalar_type(),
              "reft native cpu: saved must be (N, d) in grad2d's dtype");
  auto sv = saved.contiguous();
  auto out = at::zeros({2 * nA * r * d + 2 * nA * r}, grad2d.options().dtype(compute_dtype(grad2d)));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad2d.scalar_type(), "reft_backward_rows_multi", [&] {
      using A = at::opmath_type<scalar_t>;
      Weights w;
      auto rp = make_params<A>(w, grad2d, proj, weight, bias, proj_bias, has_weight, subtract_proj,
                               act, p, seed);
      rp.r = static_cast<int>(r);
      backward_multi_cpu<scalar_t, A>(grad2d.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                      adapter.data_ptr<int64_t>(), sv.data_ptr<scalar_t>(), N, nA,
                                      rp, out.data_ptr<A>());
    });
  }
  const int64_t rd = nA * r * d, ar = nA * r;
  const bool has_c = subtract_proj && proj_bias.has_value() && proj_bias->defined();
  auto gP = out.narrow(0, 0, rd).view({nA, r, d});
  auto gW = has_weight ? out.narrow(0, rd, rd).view({nA, r, d}) : at::Tensor();
  auto gb = out.narrow(0, 2 * rd, ar).view({nA, r});
  auto gc = has_c ? out.narrow(0, 2 * rd + ar, ar).view({nA, r}) : at::Tensor();
  return {gP, gW, gb, gc};
}

}  // namespace reft
