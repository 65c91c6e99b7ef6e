// Runs the per-row adapter launchers of csrc/reft_cuda.cu (forward / backward with per-row adapters) under
// the host emulation: reads the problem from argv[1], writes [x after forward, saved, grad_h,
// stacked weight grads (A x E)] to argv[2]. The adapter order is computed here as the torch
// binding does (stable by adapter, skipped entries last).
#include <cstdio>
#include <vector>

#include "driver_io.h"

int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  const auto h = read<int64_t>(f, 11);  // M d N r A has_weight subtract_proj has_c act seed K
  const int64_t M = h[0], d = h[1], N = h[2], r = h[3], A = h[4];
  const double p = read<double>(f, 1)[0];
  auto x = read<float>(f, M * d);
  const auto rows = read<int64_t>(f, N), adapter = read<int64_t>(f, N);
  const auto P = read<float>(f, A * r * d), W = read<float>(f, A * r * d), b = read<float>(f, A * r),
             c = read<float>(f, A * r);
  auto g = read<float>(f, M * d);
  fclose(f);
  const reft::RowParams<float> rp = row_params(P, W, b, c, h.data() + 5, r, d, p);
  const int K = static_cast<int>(h[10]);
  std::vector<int64_t> order, starts(A + 1, 0);
  for (int64_t a = 0; a <= A; ++a) {
    starts[a] = static_cast<int64_t>(order.size());
    for (int64_t n = 0; n < N; ++n)
      if ((a < A && rows[n] >= 0 && adapter[n] == a) || (a == A && rows[n] < 0)) order.push_back(n);
  }
  const int64_t E = 2 * r * d + 2 * r;
  std::vector<float> saved(N * d), out(A * E), coef((N ? N : 1) * 3 * r), partial(A * K * E);
  reft_cuda::forward(reft_cuda::DType::kFloat, x.data(), rows.data(), adapter.data(),
                           saved.data(), N, rp, nullptr);
  reft_cuda::backward(reft_cuda::DType::kFloat, g.data(), rows.data(), adapter.data(),
                            order.data(), starts.data(), A, saved.data(), N, rp, coef.data(),
                            partial.data(), K, out.data(), nullptr);
  FILE* o = fopen(argv[2], "wb");
  for (auto* v : {&x, &saved, &g, &out}) fwrite(v->data(), sizeof(float), v->size(), o);
  fclose(o);
  return 0;
}
