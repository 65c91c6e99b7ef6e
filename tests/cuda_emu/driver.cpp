// Runs the CUDA launchers of csrc/reft_cuda.cu with one adapter (null adapter / order) under the host emulation (cuda_runtime.h here):
// reads the problem from argv[1], writes [x after forward, saved, grad_h, weight grads] to argv[2].
#include <c10/util/BFloat16.h>

#include <cstdio>
#include <vector>

#include "driver_io.h"

template <typename S> void run(reft_cuda::DType dt, std::vector<float>& x, std::vector<float>& g,
                               std::vector<float>& saved, const std::vector<int64_t>& rows,
                               const reft::RowParams<float>& p, std::vector<float>& out, int K) {
  const int64_t N = rows.size();
  std::vector<S> xs(x.begin(), x.end()), gs(g.begin(), g.end()), ss(saved.size());
  std::vector<float> coef((N ? N : 1) * 3 * p.r), partial(K * out.size());
  reft_cuda::forward(dt, xs.data(), rows.data(), nullptr, ss.data(), N, p, nullptr);
  reft_cuda::backward(dt, gs.data(), rows.data(), nullptr, nullptr, nullptr, 1, ss.data(), N, p, coef.data(),
                      partial.data(), K,
                      out.data(), nullptr);
  for (size_t i = 0; i < x.size(); ++i) x[i] = xs[i], g[i] = gs[i];
  for (size_t i = 0; i < saved.size(); ++i) saved[i] = ss[i];
}

int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  const auto h = read<int64_t>(f, 10);  // M d N r has_weight subtract_proj has_c act seed bf16
  const int64_t M = h[0], d = h[1], N = h[2], r = h[3];
  const double p = read<double>(f, 1)[0];
  auto x = read<float>(f, M * d);
  const auto rows = read<int64_t>(f, N);
  const auto P = read<float>(f, r * d), W = read<float>(f, r * d), b = read<float>(f, r),
             c = read<float>(f, r);
  auto g = read<float>(f, M * d);
  fclose(f);
  const reft::RowParams<float> rp = row_params(P, W, b, c, h.data() + 4, r, d, p);
  const int K = reft_cuda::backward_chunks(N, d, /*sm_count=*/3);
  std::vector<float> saved(N * d), out(2 * r * d + 2 * r);
  if (h[9]) run<c10::BFloat16>(reft_cuda::DType::kBFloat16, x, g, saved, rows, rp, out, K);
  else run<float>(reft_cuda::DType::kFloat, x, g, saved, rows, rp, out, K);
  FILE* o = fopen(argv[2], "wb");
  for (auto* v : {&x, &saved, &g, &out}) fwrite(v->data(), sizeof(float), v->size(), o);
  fclose(o);
  return 0;
}
