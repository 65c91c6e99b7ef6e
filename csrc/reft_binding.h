// Torch-side helpers shared by the CPU and CUDA bindings: argument checks, weight conversion to
// the compute dtype and the RowParams of reft_rows.h. The launcher contract is the one of
// reft_kernels/ops/autograd.py (forward_rows / backward_rows, stacked adapters).
#pragma once

#include <optional>
#include <tuple>

#include <torch/extension.h>

#include "reft_rows.h"

namespace reft {

// The weights converted once per call to the compute dtype (they are r x d: cheap), kept alive
// for as long as the RowParams pointing into them.
struct Weights {
  at::Tensor P, W, b, c;
};

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Stacked proj/weight (A, r, d), bias (A, r), adapter (N,) like rows.
inline void check_rows_args(const at::Tensor& x2d, const at::Tensor& rows, const at::Tensor& adapter,
                            const at::Tensor& proj, const std::optional<at::Tensor>& weight,
                            const at::Tensor& bias, bool has_weight) {
  TORCH_CHECK(x2d.dim() == 2 && x2d.is_contiguous(), "reft native: x2d must be a contiguous (M, d) tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "reft native: rows must be an int64 (N,) tensor");
  TORCH_CHECK(adapter.sizes() == rows.sizes() && adapter.scalar_type() == at::kLong,
              "reft native: adapter must be an int64 (N,) tensor like rows");
  TORCH_CHECK(proj.dim() == 3 && proj.size(2) == x2d.size(1), "reft native: proj must be (A, r, d)");
  TORCH_CHECK(!has_weight || (weight.has_value() && weight->sizes() == proj.sizes()),
              "reft native: weight must be (A, r, d) for variants with a learned source");
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == proj.size(0) && bias.size(1) == proj.size(1),
              "reft native: bias must be (A, r)");
}

inline at::Tensor to_compute(const at::Tensor& t, at::ScalarType cd, const at::Device& dev) {
  return t.to(dev, cd).contiguous();
}

template <typename A>
RowParams<A> make_params(Weights& w, const at::Tensor& x2d, const at::Tensor& proj,
                         const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& proj_bias, bool has_weight,
                         bool subtract_proj, int64_t act, double p, int64_t seed) {
  const auto cd = compute_dtype(x2d);
  const auto dev = x2d.device();
  w.P = to_compute(proj, cd, dev);
  w.b = to_compute(bias, cd, dev);
  if (has_weight) w.W = to_compute(*weight, cd, dev);
  if (subtract_proj && proj_bias.has_value() && proj_bias->defined()) w.c = to_compute(*proj_bias, cd, dev);
  RowParams<A> rp;
  rp.P = w.P.data_ptr<A>();
  rp.W = w.W.defined() ? w.W.data_ptr<A>() : nullptr;
  rp.b = w.b.data_ptr<A>();
  rp.c = w.c.defined() ? w.c.data_ptr<A>() : nullptr;
  rp.r = static_cast<int>(proj.size(1));  // proj is the (A, r, d) stack
  rp.d = x2d.size(1);
  rp.act = static_cast<int>(act);
  rp.has_weight = has_weight;
  rp.subtract_proj = subtract_proj;
  rp.dropout = p > 0.0;
  rp.seed = static_cast<uint64_t>(seed);
  rp.threshold = static_cast<uint32_t>(p * 16777216.0);  // int(p * 2**24), as family.dropout_threshold
  rp.scale = static_cast<A>(1.0 / (1.0 - p));
  return rp;
}

// The backward's (A, E) fp32/fp64 buffer, each row [grad_P (r d) | grad_W (r d) | grad_b (r) |
// grad_c (r)] -> the stacked (grad_proj, grad_weight, grad_bias, grad_proj_bias); absent ones are
// undefined tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_grads(
    const at::Tensor& out, int64_t n_adapters, int64_t r, int64_t d, bool has_weight, bool has_proj_bias) {
  const auto rows = out.view({n_adapters, 2 * r * d + 2 * r});
  // copies: the outputs of a torch.library custom op may not alias each other
  auto part = [&](int64_t start, int64_t len) { return rows.narrow(1, start, len).clone(at::MemoryFormat::Contiguous); };
  auto gP = part(0, r * d).view({n_adapters, r, d});
  auto gW = has_weight ? part(r * d, r * d).view({n_adapters, r, d}) : at::Tensor();
  auto gb = part(2 * r * d, r);
  auto gc = has_proj_bias ? part(2 * r * d + r, r) : at::Tensor();
  return {gP, gW, gb, gc};
}

}  // namespace reft
