// Torch binding of the CUDA launchers (reft_cuda.cu): the launcher contract of
// reft_kernels/ops/autograd.py on CUDA tensors, on the current stream, without host syncs.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "reft_binding.h"
#include "reft_cuda.h"

namespace reft {
namespace {

reft_cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return reft_cuda::DType::kFloat;
    case at::kDouble: return reft_cuda::DType::kDouble;
    case at::kBFloat16: return reft_cuda::DType::kBFloat16;
    case at::kHalf: return reft_cuda::DType::kHalf;
    default: TORCH_CHECK(false, "reft native cuda: unsupported dtype ", x.scalar_type());
  }
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "reft native cuda: ", cudaGetErrorString(err)); }

at::Tensor forward_rows(at::Tensor x2d, at::Tensor rows, at::Tensor proj,
                        std::optional<at::Tensor> weight, at::Tensor bias,
                        std::optional<at::Tensor> proj_bias, bool has_weight, bool subtract_proj,
                        int64_t act, double p, int64_t seed) {
  check_rows_args(x2d, rows, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  TORCH_CHECK(x2d.is_cuda(), "reft native cuda: x2d must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x2d.device());
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Weights w;
  if (x2d.scalar_type() == at::kDouble) {
    const auto rp = make_params<double>(w, x2d, proj, weight, bias, proj_bias, has_weight,
                                        subtract_proj, act, p, seed);
    check(reft_cuda::forward(dtype_of(x2d), x2d.data_ptr(), rows.data_ptr<int64_t>(),
                             saved.data_ptr(), N, rp, stream));
  } else {
    const auto rp = make_params<float>(w, x2d, proj, weight, bias, proj_bias, has_weight,
                                       subtract_proj, act, p, seed);
    check(reft_cuda::forward(dtype_of(x2d), x2d.data_ptr(), rows.data_ptr<int64_t>(),
                             saved.data_ptr(), N, rp, stream));
  }
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows(
    at::Tensor grad2d, at::Tensor rows, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  check_rows_args(grad2d, rows, proj, weight, bias, has_weight);
  rows = rows.contiguous();
  TORCH_CHECK(grad2d.is_cuda(), "reft native cuda: grad2d must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad2d.device());
  const int64_t N = rows.numel(), d = grad2d.size(1), r = proj.size(0), E = 2 * r * d + 2 * r;
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, d}) && saved.scalar_type() == grad2d.scalar_type(),
              "reft native cuda: saved must be (N, d) in grad2d's dtype");
  auto sv = saved.contiguous();
  const auto opts = grad2d.options().dtype(compute_dtype(grad2d));
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, grad2d.get_device()));
  const int K = reft_cuda::backward_chunks(N, d, sm_count);
  auto coef = at::empty({std::max<int64_t>(N, 1) * 3 * r}, opts);
  auto partial = at::empty({static_cast<int64_t>(K) * E}, opts);
  auto out = at::empty({E}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Weights w;
  if (grad2d.scalar_type() == at::kDouble) {
    const auto rp = make_params<double>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                        subtract_proj, act, p, seed);
    check(reft_cuda::backward(dtype_of(grad2d), grad2d.data_ptr(), rows.data_ptr<int64_t>(),
                              sv.data_ptr(), N, rp, coef.data_ptr<double>(),
                              partial.data_ptr<double>(), K, out.data_ptr<double>(), stream));
  } else {
    const auto rp = make_params<float>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                       subtract_proj, act, p, seed);
    check(reft_cuda::backward(dtype_of(grad2d), grad2d.data_ptr(), rows.data_ptr<int64_t>(),
                              sv.data_ptr(), N, rp, coef.data_ptr<float>(),
                              partial.data_ptr<float>(), K, out.data_ptr<float>(), stream));
  }
  return split_grads(out, r, d, has_weight, subtract_proj && proj_bias.has_value() && proj_bias->defined());
}

// ---- per-row adapters: stacked proj/weight (A, r, d), bias/proj_bias (A, r), adapter (N,) ----
at::Tensor forward_rows_multi(at::Tensor x2d, at::Tensor rows, at::Tensor adapter, at::Tensor proj,
                              std::optional<at::Tensor> weight, at::Tensor bias,
                              std::optional<at::Tensor> proj_bias, bool has_weight,
                              bool subtract_proj, int64_t act, double p, int64_t seed) {
  check_multi_args(x2d, rows, adapter, proj, weight, bias, has_weight);
  TORCH_CHECK(x2d.is_cuda() && adapter.device() == x2d.device(),
              "reft native cuda: x2d and adapter must be on the same CUDA device");
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const c10::cuda::CUDAGuard guard(x2d.device());
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Weights w;
  if (x2d.scalar_type() == at::kDouble) {
    auto rp = make_params<double>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj,
                                  act, p, seed);
    rp.r = static_cast<int>(proj.size(1));
    check(reft_cuda::forward_multi(dtype_of(x2d), x2d.data_ptr(), rows.data_ptr<int64_t>(),
                                   adapter.data_ptr<int64_t>(), saved.data_ptr(), N, rp, stream));
  } else {
    auto rp = make_params<float>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj,
                                 act, p, seed);
    rp.r = static_cast<int>(proj.size(1));
    check(reft_cuda::forward_multi(dtype_of(x2d), x2d.data_ptr(), rows.data_ptr<int64_t>(),
                                   adapter.data_ptr<int64_t>(), saved.data_ptr(), N, rp, stream));
  }
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows_multi(
    at::Tensor grad2d, at::Tensor rows, at::Tensor adapter, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  check_multi_args(grad2d, rows, adapter, proj, weight, bias, has_weight);
  TORCH_CHECK(grad2d.is_cuda() && adapter.device() == grad2d.device(),
              "reft native cuda: grad2d and adapter must be on the same CUDA device");
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const c10::cuda::CUDAGuard guard(grad2d.device());
  const int64_t N = rows.numel(), d = grad2d.size(1), nA = proj.size(0), r = proj.size(1);
  const int64_t E = 2 * r * d + 2 * r;
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, d}) && saved.scalar_type() == grad2d.scalar_type(),
              "reft native cuda: saved must be (N, d) in grad2d's dtype");
  auto sv = saved.contiguous();
  const auto opts = grad2d.options().dtype(compute_dtype(grad2d));
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, grad2d.get_device()));
  // K parts per adapter: the single-adapter chunk count spread over the adapters
  const int K0 = reft_cuda::backward_chunks(N, d, sm_count);
  const int K = static_cast<int>(std::max<int64_t>(1, (K0 + nA - 1) / nA));
  TORCH_CHECK(nA * K <= 65535, "reft native cuda: ", nA, " stacked adapters exceed the column kernel's",
              " grid limit of 65535; split the stack into groups of at most 65535 adapters");
  // live entries ordered by adapter (stable), skipped ones last: no host sync
  const auto key = at::where(rows >= 0, adapter, at::full_like(adapter, nA));
  const auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
  const auto starts = at::searchsorted(std::get<0>(at::sort(key, true, 0, false)),
                                       at::arange(nA + 1, key.options())).contiguous();
  auto coef = at::empty({std::max<int64_t>(N, 1) * 3 * r}, opts);
  auto partial = at::empty({nA * K * E}, opts);
  auto out = at::empty({nA, E}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Weights w;
  if (grad2d.scalar_type() == at::kDouble) {
    auto rp = make_params<double>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                  subtract_proj, act, p, seed);
    rp.r = static_cast<int>(r);
    check(reft_cuda::backward_multi(dtype_of(grad2d), grad2d.data_ptr(), rows.data_ptr<int64_t>(),
                                    adapter.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                    starts.data_ptr<int64_t>(), nA, sv.data_ptr(), N, rp,
                                    coef.data_ptr<double>(), partial.data_ptr<double>(), K,
                                    out.data_ptr<double>(), stream));
  } else {
    auto rp = make_params<float>(w, grad2d, proj, weight, bias, proj_bias, has_weight,
                                 subtract_proj, act, p, seed);
    rp.r = static_cast<int>(r);
    check(reft_cuda::backward_multi(dtype_of(grad2d), grad2d.data_ptr(), rows.data_ptr<int64_t>(),
                                    adapter.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                    starts.data_ptr<int64_t>(), nA, sv.data_ptr(), N, rp,
                                    coef.data_ptr<float>(), partial.data_ptr<float>(), K,
                                    out.data_ptr<float>(), stream));
  }
  const int64_t rd = r * d;
  const bool has_c = subtract_proj && proj_bias.has_value() && proj_bias->defined();
  auto gP = out.narrow(1, 0, rd).reshape({nA, r, d});
  auto gW = has_weight ? out.narrow(1, rd, rd).reshape({nA, r, d}) : at::Tensor();
  auto gb = out.narrow(1, 2 * rd, r).contiguous();
  auto gc = has_c ? out.narrow(1, 2 * rd + r, r).contiguous() : at::Tensor();
  return {gP, gW, gb, gc};
}

}  // namespace
}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reft_kernels native CUDA backend (csrc/reft_cuda.cu)";
  m.def("forward_rows", &reft::forward_rows, "edit x2d in place at rows; returns the pre-edit rows");
  m.def("backward_rows", &reft::backward_rows,
        "overwrite grad2d with grad_h at rows; returns (grad_proj, grad_weight, grad_bias, grad_proj_bias)");
  m.def("forward_rows_multi", &reft::forward_rows_multi,
        "per-row adapters: edit x2d in place at rows, entry n with adapter[n]; returns the pre-edit rows");
  m.def("backward_rows_multi", &reft::backward_rows_multi,
        "per-row adapters: overwrite grad2d with grad_h at rows; returns the stacked weight gradients");
}
