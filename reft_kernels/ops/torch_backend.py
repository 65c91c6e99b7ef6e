"""The ``torch`` backend: the family's hand-derived forward and backward in plain PyTorch ops.

Implements the backend contract of :mod:`reft_kernels.ops.autograd` (``forward_rows`` and
``backward_rows``) with a few batched matmuls over the N selected rows, so it runs on any device.
It issues no host sync: rows marked -1 (pads, duplicates) are redirected to a row that is really
edited and rewrite exactly the bytes that row gets, so ``index_copy_`` stays deterministic.
"""
from __future__ import annotations

import torch

from .family import activation, activation_grad, compute_dtype, dropout_keep_mask

__all__ = ["forward_rows", "backward_rows", "forward_rows_multi", "backward_rows_multi"]


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


def _sources(hf, P, weight, bias, proj_bias, spec, act, cd):
    """s = A(h) - C(h) and, for variants with W, z = W h + b."""
    z = None
    if spec.has_weight:
        z = hf @ weight.to(cd).t() + bias.to(cd)
        s = activation(act, z)
    else:
        s = bias.to(cd).expand(hf.shape[0], -1)
    if spec.subtract_proj:
        s = s - hf @ P.t()
        if proj_bias is not None:
            s = s - proj_bias.to(cd)
    return s, z


def forward_rows(x2d, rows, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``x2d`` (M, d) in place at ``rows``; return the pre-edit rows (N, d)."""
    N, d = rows.numel(), x2d.shape[1]
    if N == 0:
        return x2d.new_empty((0, d))
    tgt, _, fix = _targets(rows)
    h = x2d.index_select(0, tgt)
    cd = compute_dtype(x2d)
    hf, P = h.to(cd), proj.to(cd)
    s, _ = _sources(hf, P, weight, bias, proj_bias, spec, act, cd)
    new = torch.addmm(hf, s, P)
    if p:
        new = new * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    x2d.index_copy_(0, tgt, fix(new, hf).to(x2d.dtype))
    return h


def backward_rows(grad2d, rows, saved, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``grad2d`` (a private copy of the upstream gradient) at ``rows``; return fp32 weight grads.

    Returns ``(grad_proj, grad_weight, grad_bias, grad_proj_bias)``; absent ones are None.
    """
    N, d = rows.numel(), grad2d.shape[1]
    cd = compute_dtype(grad2d)
    r = proj.shape[0]
    if N == 0:
        z = lambda *shape: grad2d.new_zeros(shape, dtype=cd)  # noqa: E731
        return (z(r, d), z(r, d) if spec.has_weight else None, z(r),
                z(r) if proj_bias is not None else None)
    tgt, valid, fix = _targets(rows)
    g = grad2d.index_select(0, tgt).to(cd)
    if p:
        g = g * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    hf, P = saved.to(cd), proj.to(cd)
    s, z = _sources(hf, P, weight, bias, proj_bias, spec, act, cd)
    u = g @ P.t()
    grad_h = g
    w = valid.to(cd).unsqueeze(1)
    grad_w = grad_b = grad_c = None
    if spec.has_weight:
        v = u * activation_grad(act, z)
        grad_h = torch.addmm(grad_h, v, weight.to(cd))
        vw = v * w
        grad_w = vw.t() @ hf
        grad_b = vw.sum(0)
    else:
        grad_b = (u * w).sum(0)
    grad_p = (s * w).t() @ g
    if spec.subtract_proj:
        uw = u * w
        grad_h = grad_h - u @ P
        grad_p = grad_p - uw.t() @ hf
        if proj_bias is not None:
            grad_c = -uw.sum(0)
    unchanged = grad2d.index_select(0, tgt).to(cd)
    grad2d.index_copy_(0, tgt, fix(grad_h, unchanged).to(grad2d.dtype))
    return grad_p, grad_w, grad_b, grad_c


# --------------------------------------------------------------------------------------------
# per-row adapters (see reft_kernels/ops/multi.py): each entry n uses adapter ``adapter[n]``
# --------------------------------------------------------------------------------------------
def _gather(t, adapter, cd):
    """Each entry's slice of a stacked weight, in the compute dtype ((N, r, d) or (N, r))."""
    return None if t is None else t.to(cd).index_select(0, adapter)


def _sources_multi(hf, P, W, b, c, spec, act):
    """Per-entry s (N, r) and z (N, r) (z only with W), with gathered weights P, W (N, r, d)."""
    z = None
    if spec.has_weight:
        z = torch.bmm(W, hf.unsqueeze(2)).squeeze(2) + b
        s = activation(act, z)
    else:
        s = b
    if spec.subtract_proj:
        s = s - torch.bmm(P, hf.unsqueeze(2)).squeeze(2)
        if c is not None:
            s = s - c
    return s, z


def forward_rows_multi(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``x2d`` (M, d) in place at ``rows``, entry n with adapter ``adapter[n]``; return saved."""
    N, d = rows.numel(), x2d.shape[1]
    if N == 0:
        return x2d.new_empty((0, d))
    tgt, _, fix = _targets(rows)
    h = x2d.index_select(0, tgt)
    cd = compute_dtype(x2d)
    hf = h.to(cd)
    P = _gather(proj, adapter, cd)
    s, _ = _sources_multi(hf, P, _gather(weight, adapter, cd), _gather(bias, adapter, cd),
                          _gather(proj_bias, adapter, cd), spec, act)
    new = hf + torch.bmm(s.unsqueeze(1), P).squeeze(1)
    if p:
        new = new * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    x2d.index_copy_(0, tgt, fix(new, hf).to(x2d.dtype))
    return h


def backward_rows_multi(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act,
                        p, seed):
    """Edit ``grad2d`` at ``rows``; return the stacked fp32 weight grads (A, r, d) / (A, r).

    Per-entry terms are summed into their adapter's slice with ``index_add_`` (in entry order on
    CPU; on CUDA it follows torch's deterministic-algorithms setting).
    """
    N, d = rows.numel(), grad2d.shape[1]
    cd = compute_dtype(grad2d)
    A, r, _ = proj.shape
    zeros = lambda *shape: grad2d.new_zeros(shape, dtype=cd)  # noqa: E731
    grad_p, grad_b = zeros(A, r, d), zeros(A, r)
    grad_w = zeros(A, r, d) if spec.has_weight else None
    grad_c = zeros(A, r) if proj_bias is not None else None
    if N == 0:
        return grad_p, grad_w, grad_b, grad_c
    tgt, valid, fix = _targets(rows)
    g = grad2d.index_select(0, tgt).to(cd)
    if p:
        g = g * dropout_keep_mask(seed, tgt, d, p).to(cd) * (1.0 / (1.0 - p))
    hf = saved.to(cd)
    P, W = _gather(proj, adapter, cd), _gather(weight, adapter, cd)
    s, z = _sources_multi(hf, P, W, _gather(bias, adapter, cd), _gather(proj_bias, adapter, cd),
                          spec, act)
    u = torch.bmm(P, g.unsqueeze(2)).squeeze(2)
    w = valid.to(cd).unsqueeze(1)
    outer = lambda a, b: torch.bmm((a * w).unsqueeze(2), b.unsqueeze(1))  # noqa: E731
    grad_h = g
    if spec.has_weight:
        v = u * activation_grad(act, z)
        grad_h = grad_h + torch.bmm(v.unsqueeze(1), W).squeeze(1)
        grad_w.index_add_(0, adapter, outer(v, hf))
        grad_b.index_add_(0, adapter, v * w)
    else:
        grad_b.index_add_(0, adapter, u * w)
    gp_rows = outer(s, g)
    if spec.subtract_proj:
        grad_h = grad_h - torch.bmm(u.unsqueeze(1), P).squeeze(1)
        gp_rows = gp_rows - outer(u, hf)
        if proj_bias is not None:
            grad_c.index_add_(0, adapter, -u * w)
    grad_p.index_add_(0, adapter, gp_rows)
    unchanged = grad2d.index_select(0, tgt).to(cd)
    grad2d.index_copy_(0, tgt, fix(grad_h, unchanged).to(grad2d.dtype))
    return grad_p, grad_w, grad_b, grad_c
