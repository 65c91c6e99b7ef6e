"""The ``torch`` backend: the op's hand-derived forward and backward in plain PyTorch ops.

Implements the backend contract of :mod:`reft_kernels.ops.autograd` (``forward_rows`` and
``backward_rows``) with a few batched matmuls over the N selected rows, so it runs on any device.
It issues no host sync: rows marked -1 (pads, duplicates) are redirected to a row that is really
edited and rewrite exactly the bytes that row gets, so ``index_copy_`` stays deterministic.
"""
from __future__ import annotations

import torch

from .variants import activation, activation_grad, compute_dtype, dropout_keep_mask

__all__ = ["forward_rows", "backward_rows"]


def _targets(rows: torch.Tensor):
    """Flat target rows for every entry (no -1), the valid mask, and a fixer for skip entries.

    A skip entry targets the largest listed row ``m`` (the one edited by entry ``j = argmax``) and
    must write exactly entry j's value; with no listed row at all, it targets row 0 and writes the
    value it read (so nothing changes).
    """
    valid = rows >= 0
    j = rows.argmax().view(1)
    m = rows.index_select(0, j)
    tgt = torch.where(valid, rows, m).clamp(min=0)

    def fix(new: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
        new = torch.where(valid.unsqueeze(1), new, new.index_select(0, j))
        return torch.where(m >= 0, new, unchanged)

    return tgt, valid, fix


# --------------------------------------------------------------------------------------------
# Each entry n uses adapter ``adapter[n]``. Two exact formulations, chosen by the stack's width A * r:
#   dense  (A * r <= DENSE_MAX_WIDTH): every row against ALL stacked rank rows in one matmul,
#          (N, d) @ (d, A r), then each row picks its adapter's r columns; the edit and the
#          gradients use the block one-hot expansion E(t) (N, A r) of a per-row r-vector t
#          (t in the row's adapter block, zeros elsewhere): out = h + E(s) P_all,
#          grad_P_all = E(s)^T g' - E(u)^T h, ... Plain matmuls: deterministic, A x the flops of
#          one adapter, which BLAS absorbs while A r is small. With A = 1 pick and expand are the
#          identity: plain (N, d) @ (d, r) matmuls, nothing gathered.
#   gather (wider stacks): each row's (r, d) slices gathered, batched matmuls over rows, and
#          the per-row weight-gradient terms summed into their adapter with ``index_add_``.
# --------------------------------------------------------------------------------------------
DENSE_MAX_WIDTH = 128


class _Dense:
    """The stack as (A r, d) matrices and the pick / expand maps between r and A r columns."""

    def __init__(self, adapter, n_adapters, r):
        self.A, self.r = n_adapters, r
        if n_adapters > 1:
            self.idx = adapter.view(-1, 1, 1).expand(-1, 1, r)
            self.onehot = torch.nn.functional.one_hot(adapter, n_adapters)

    def pick(self, full):                      # (N, A r) -> (N, r): the row's own block
        if self.A == 1:
            return full
        return full.view(-1, self.A, self.r).gather(1, self.idx).squeeze(1)

    def expand(self, t):                       # (N, r) -> (N, A r): E(t)
        if self.A == 1:
            return t
        return (self.onehot.to(t.dtype).unsqueeze(2) * t.unsqueeze(1)).reshape(t.shape[0], -1)


def _sources(hf, P, W, b, c, spec, act, dense):
    """Per-entry s (N, r) and z (N, r) (z only with W). Dense: P, W are (A r, d) and b, c are
    already picked (N, r) (or (1, r) with A = 1); gather: P, W are the gathered (N, r, d) slices."""
    mv = (lambda M: dense.pick(hf @ M.t())) if dense else \
        (lambda M: torch.bmm(M, hf.unsqueeze(2)).squeeze(2))  # noqa: E731
    z = None
    if spec.has_weight:
        z = mv(W) + b
        s = activation(act, z)
    else:
        s = b.expand(hf.shape[0], -1)
    if spec.subtract_proj:
        s = s - mv(P)
        if c is not None:
            s = s - c
    return s, z


def _operands(adapter, proj, weight, bias, proj_bias, cd):
    """(P, W, b, c, dense) for _sources: dense for narrow stacks, else gathered slices."""
    A, r, d = proj.shape
    pick = lambda t: None if t is None else t.to(cd).index_select(0, adapter)  # noqa: E731
    if A == 1:      # one adapter: its (r,) vectors broadcast over the rows
        pick = lambda t: None if t is None else t.to(cd)  # noqa: E731
    if A * r <= DENSE_MAX_WIDTH or A == 1:
        flat = lambda t: None if t is None else t.to(cd).reshape(A * r, d)  # noqa: E731
        return flat(proj), flat(weight), pick(bias), pick(proj_bias), _Dense(adapter, A, r)
    return pick(proj), pick(weight), pick(bias), pick(proj_bias), None


def _times(t, M, dense):
    """t (N, r) applied to each row's stacked matrix M: t P_a (N, d)."""
    if dense:
        return dense.expand(t) @ M
    return torch.bmm(t.unsqueeze(1), M).squeeze(1)


def forward_rows(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``x2d`` (M, d) in place at ``rows``, entry n with adapter ``adapter[n]``; return saved."""
    N, d = rows.numel(), x2d.shape[1]
    if N == 0:
        return x2d.new_empty((0, d))
    tgt, _, fix = _targets(rows)
    h = x2d.index_select(0, tgt)
    cd = compute_dtype(x2d)
    hf = h.to(cd)
    P, W, b, c, dense = _operands(adapter, proj, weight, bias, proj_bias, cd)
    s, _ = _sources(hf, P, W, b, c, spec, act, dense)
    new = hf + _times(s, P, dense)
    if p:
        new = new * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    x2d.index_copy_(0, tgt, fix(new, hf).to(x2d.dtype))
    return h


def backward_rows(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``grad2d`` at ``rows``; return the stacked fp32 weight grads (A, r, d) / (A, r).

    Dense: E(.)^T matmuls (deterministic). Gather: per-entry terms summed into their adapter's
    slice with ``index_add_`` (in entry order on CPU; on CUDA it follows torch's
    deterministic-algorithms setting).
    """
    N, d = rows.numel(), grad2d.shape[1]
    cd = compute_dtype(grad2d)
    A, r, _ = proj.shape
    zeros = lambda *shape: grad2d.new_zeros(shape, dtype=cd)  # noqa: E731
    if N == 0:
        return (zeros(A, r, d), zeros(A, r, d) if spec.has_weight else None, zeros(A, r),
                zeros(A, r) if proj_bias is not None else None)
    tgt, valid, fix = _targets(rows)
    g = grad2d.index_select(0, tgt).to(cd)
    if p:
        g = g * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    hf = saved.to(cd)
    P, W, b, c, dense = _operands(adapter, proj, weight, bias, proj_bias, cd)
    s, z = _sources(hf, P, W, b, c, spec, act, dense)
    u = dense.pick(g @ P.t()) if dense else torch.bmm(P, g.unsqueeze(2)).squeeze(2)
    w = valid.to(cd).unsqueeze(1)
    if dense:   # sum over rows of t_n x_n^T into each row's adapter block: E(t w)^T x
        outer_sum = lambda t, x: (dense.expand(t * w).t() @ x).view(A, r, d)  # noqa: E731
        vec_sum = lambda t: dense.expand(t * w).sum(0).view(A, r)  # noqa: E731
    else:
        outer_sum = lambda t, x: zeros(A, r, d).index_add_(  # noqa: E731
            0, adapter, torch.bmm((t * w).unsqueeze(2), x.unsqueeze(1)))
        vec_sum = lambda t: zeros(A, r).index_add_(0, adapter, t * w)  # noqa: E731
    grad_h, grad_w, grad_c = g, None, None
    if spec.has_weight:
        v = u * activation_grad(act, z)
        grad_h = grad_h + _times(v, W, dense)
        grad_w, grad_b = outer_sum(v, hf), vec_sum(v)
    else:
        grad_b = vec_sum(u)
    grad_p = outer_sum(s, g)
    if spec.subtract_proj:
        grad_h = grad_h - _times(u, P, dense)
        grad_p = grad_p - outer_sum(u, hf)
        if proj_bias is not None:
            grad_c = -vec_sum(u)
    unchanged = grad2d.index_select(0, tgt).to(cd)
    grad2d.index_copy_(0, tgt, fix(grad_h, unchanged).to(grad2d.dtype))
    return grad_p, grad_w, grad_b, grad_c
