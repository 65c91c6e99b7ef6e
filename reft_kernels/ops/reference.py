"""Plain-PyTorch reference of the ReFT op family: the test oracle and the benchmarks' baselines.

:func:`reft_edit_reference` is written for obviousness, not speed: it deduplicates positions in
Python, gathers the rows, applies the family formula (see :mod:`reft_kernels.ops.family`) with
ordinary differentiable torch ops, and writes the rows back with ``index_put``. Autograd derives
every gradient, so it checks the hand-derived backward of the other backends. Run it in float64
for the oracle.

:func:`pyvene_style` reproduces what pyreft/pyvene do per intervention call (clone the whole
hidden state, gather, separate small ops, scatter back); it is the benchmarks' naive baseline.
"""
from __future__ import annotations

import torch

from .family import VARIANTS, activation, compute_dtype, dropout_keep_mask

__all__ = ["reft_edit_reference", "edit_rows_reference", "pyvene_style"]


def edit_rows_reference(h, proj, weight, bias, proj_bias, *, variant, act=None, dropout=0.0,
                        seed=0, rows=None):
    """The family formula on gathered rows ``h`` (N, d), differentiable; returns (N, d) in h's dtype.

    ``rows`` (the rows' flat indices) is only needed for dropout, whose mask depends on them.
    """
    spec = VARIANTS[variant]
    cd = compute_dtype(h)
    hf = h.to(cd)
    P = proj.to(cd)
    if spec.has_weight:
        s = activation(spec.act_name(act), hf @ weight.to(cd).t() + bias.to(cd))
    else:
        s = bias.to(cd).expand(hf.shape[0], -1)
    if spec.subtract_proj:
        s = s - hf @ P.t()
        if proj_bias is not None:
            s = s - proj_bias.to(cd)
    out = hf + s @ P
    if dropout:
        keep = dropout_keep_mask(seed, rows, h.shape[1], dropout)
        out = out * keep.to(cd) / (1.0 - dropout)
    return out.to(h.dtype)


def _unique_rows(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    rows = []
    for b, row in enumerate(positions.tolist()):
        rows += [b * seq_len + p for p in sorted(set(row)) if p >= 0]
    return torch.tensor(rows, dtype=torch.int64, device=positions.device)


def reft_edit_reference(hidden, positions, proj, weight=None, bias=None, proj_bias=None, *,
                        variant="loreft", act=None, dropout=0.0, seed=0, inplace=False):
    """Reference of :func:`reft_kernels.ops.reft_edit`: hidden (B, T, d) with listed rows edited."""
    B, T, d = hidden.shape
    idx = _unique_rows(positions, T)
    flat = hidden.reshape(B * T, d)
    new = edit_rows_reference(flat[idx], proj, weight, bias, proj_bias, variant=variant, act=act,
                              dropout=dropout, seed=seed, rows=idx)
    if inplace:
        hidden.view(B * T, d).index_put_((idx,), new)
        return hidden
    return flat.index_put((idx,), new).view(B, T, d)


def pyvene_style(hidden, positions, proj, weight, bias, *, act=None):
    """LoReFT the way pyvene applies it (positions >= 0); edits ``hidden`` in place and returns it.

    Mirrors ``_gather_intervention_output`` (a full ``clone()`` of the module output, then
    ``torch.gather``), ``LoreftIntervention.forward`` (rotation as a (d, r) matrix, separate small
    ops) and ``_scatter_intervention_output`` (advanced-index assignment into the module output).
    """
    original = hidden.clone()
    idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    selected = torch.gather(original, 1, idx)
    rot = proj.t()                                   # pyreft's rotate_layer.weight is (d, r)
    rotated = torch.matmul(selected.to(rot.dtype), rot)
    src = torch.nn.functional.linear(selected.to(weight.dtype), weight, bias)
    src = activation("linear" if act is None else act, src)
    out = selected + torch.matmul(src.to(rot.dtype) - rotated, rot.t()).to(selected.dtype)
    batch = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    hidden[batch, positions] = out.to(hidden.dtype)
    return hidden
