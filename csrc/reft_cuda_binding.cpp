// Torch binding of the CUDA launchers (reft_cuda.cu): the launcher contract of
// reft_kernels/ops/autograd.py (stacked adapters) on CUDA tensors, on the current stream, without host syncs.
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

// The float / double compute-dtype dispatch, once: calls fn(RowParams<A>, A-typed tag).
template <typename Fn>
void with_params(const at::Tensor& x2d, const at::Tensor& proj, const std::optional<at::Tensor>& weight,
                 const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool has_weight,
                 bool subtract_proj, int64_t act, double p, int64_t seed, Fn&& fn) {
  Weights w;
  if (x2d.scalar_type() == at::kDouble)
    fn(make_params<double>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj, act, p, seed));
  else
    fn(make_params<float>(w, x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj, act, p, seed));
}

at::Tensor forward_rows(at::Tensor x2d, at::Tensor rows, at::Tensor adapter, at::Tensor proj,
                        std::optional<at::Tensor> weight, at::Tensor bias,
                        std::optional<at::Tensor> proj_bias, bool has_weight, bool subtract_proj,
                        int64_t act, double p, int64_t seed) {
  check_rows_args(x2d, rows, adapter, proj, weight, bias, has_weight);
  TORCH_CHECK(x2d.is_cuda(), "reft native cuda: x2d must be a CUDA tensor");
  rows = rows.contiguous();
  adapter = adapter.contiguous();
  const c10::cuda::CUDAGuard guard(x2d.device());
  const int64_t N = rows.numel(), d = x2d.size(1);
  auto saved = at::empty({N, d}, x2d.options());
  if (N == 0) return saved;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  // one adapter: no per-entry slice lookup
  const int64_t* ad = proj.size(0) == 1 ? nullptr : adapter.data_ptr<int64_t>();
  with_params(x2d, proj, weight, bias, proj_bias, has_weight, subtract_proj, act, p, seed, [&](const auto& rp) {
    check(reft_cuda::forward(dtype_of(x2d), x2d.data_ptr(), rows.data_ptr<int64_t>(), ad,
                             saved.data_ptr(), N, rp, stream));
  });
  return saved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_rows(
    at::Tensor grad2d, at::Tensor rows, at::Tensor adapter, at::Tensor saved, at::Tensor proj,
    std::optional<at::Tensor> weight, at::Tensor bias, std::optional<at::Tensor> proj_bias,
    bool has_weight, bool subtract_proj, int64_t act, double p, int64_t seed) {
  check_rows_args(grad2d, rows, adapter, proj, weight, bias, has_weight);
  TORCH_CHECK(grad2d.is_cuda(), "reft native cuda: grad2d must be a CUDA tensor");
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
  // K parts per adapter: the chunk count of one adapter spread over the adapters
  const int K0 = reft_cuda::backward_chunks(N, d, sm_count);
  const int K = static_cast<int>(std::max<int64_t>(1, (K0 + nA - 1) / nA));
  TORCH_CHECK(nA * K <= 65535, "reft native cuda: ", nA, " stacked adapters exceed the column kernel's",
              " grid limit of 65535; split the stack into groups of at most 65535 adapters");
  // live entries ordered by adapter (stable), skipped ones last: no host sync. One adapter: none
  // (the kernels then walk the entries in their own order).
  at::Tensor order, starts;
  if (nA > 1) {
    const auto key = at::where(rows >= 0, adapter, at::full_like(adapter, nA));
    const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    order = std::get<1>(sorted).contiguous();
    starts = at::searchsorted(std::get<0>(sorted), at::arange(nA + 1, key.options())).contiguous();
  }
  auto coef = at::empty({std::max<int64_t>(N, 1) * 3 * r}, opts);
  auto partial = at::empty({nA * K * E}, opts);
  auto out = at::empty({nA * E}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t* ad = nA > 1 ? adapter.data_ptr<int64_t>() : nullptr;
  const int64_t* ord = nA > 1 ? order.data_ptr<int64_t>() : nullptr;
  const int64_t* st = nA > 1 ? starts.data_ptr<int64_t>() : nullptr;
  with_params(grad2d, proj, weight, bias, proj_bias, has_weight, subtract_proj, act, p, seed, [&](const auto& rp) {
    using A = std::remove_const_t<std::remove_pointer_t<decltype(rp.P)>>;  // float or double
    check(reft_cuda::backward(dtype_of(grad2d), grad2d.data_ptr(), rows.data_ptr<int64_t>(), ad, ord,
                              st, nA, sv.data_ptr(), N, rp, coef.data_ptr<A>(), partial.data_ptr<A>(),
                              K, out.data_ptr<A>(), stream));
  });
  return split_grads(out, nA, r, d, has_weight, subtract_proj && proj_bias.has_value() && proj_bias->defined());
}

}  // namespace
}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reft_kernels native CUDA backend (csrc/reft_cuda.cu)";
  m.def("forward_rows", &reft::forward_rows,
        "edit x2d in place at rows, entry n with adapter[n]; returns the pre-edit rows");
  m.def("backward_rows", &reft::backward_rows,
        "overwrite grad2d with grad_h at rows; returns the stacked (grad_proj, grad_weight, grad_bias, grad_proj_bias)");
}
