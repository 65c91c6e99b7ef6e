"""Plain-PyTorch reference of the ReFT op family: the test oracle and the benchmarks' baselines.

:func:`reft_edit_multi_reference` (per-row adapters) and :func:`reft_edit_reference` (one
adapter) are written for obviousness, not speed: they deduplicate positions in Python, gather
each batch row's rows, apply the formula (see :mod:`reft_kernels.ops.variants`) with its
adapter's slice in ordinary differentiable torch ops, and write the rows back with
``index_put``. Autograd derives every gradient, so they check the hand-derived backward of the
other backends. Run them in float64 for the oracle.

:func:`pyvene_style` reproduces what pyreft/pyvene do per intervention call (clone the whole
hidden state, gather, separate small ops, scatter back); it is the benchmarks' naive baseline.
"""
from __future__ import annotations

import torch

from .variants import VARIANTS, activation, compute_dtype, dropout_keep_mask

__all__ = ["reft_edit_reference", "reft_edit_multi_reference", "edit_rows_reference", "pyvene_style"]


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


def reft_edit_multi_reference(hidden, positions, stack_ids, proj, weight=None, bias=None,
                              proj_bias=None, *, variant="loreft", act=None, dropout=0.0, seed=0,
                              inplace=False, ranks=None, backend=None):
    """Reference of :func:`reft_kernels.ops.reft_edit_multi` (same signature; ``ranks`` and
    ``backend`` are accepted and unused): batch row b's listed positions edited with adapter
    ``stack_ids[b]``'s slice of the stacked weights (-1 or a None ``stack_ids``: see there)."""
    B, T, d = hidden.shape
    ids = [0] * B if stack_ids is None else stack_ids.tolist()
    flat = hidden.reshape(B * T, d)
    slice_of = lambda t, a: None if t is None else t[a]  # noqa: E731
    idx, new = [], []
    for b, (a, row) in enumerate(zip(ids, positions.tolist())):
        rows = torch.tensor([b * T + p for p in sorted(set(row)) if p >= 0], dtype=torch.int64,
                            device=hidden.device)
        if a < 0 or rows.numel() == 0:
            continue
        idx.append(rows)
        new.append(edit_rows_reference(flat[rows], proj[a], slice_of(weight, a), bias[a],
                                       slice_of(proj_bias, a), variant=variant, act=act,
                                       dropout=dropout, seed=seed, rows=rows))
    if not idx:
        return hidden if inplace else hidden.clone()
    idx, new = torch.cat(idx), torch.cat(new)
    if inplace:
        hidden.view(B * T, d).index_put_((idx,), new)
        return hidden
    return flat.index_put((idx,), new).view(B, T, d)


def reft_edit_reference(hidden, positions, proj, weight=None, bias=None, proj_bias=None, *,
                        variant="loreft", act=None, dropout=0.0, seed=0, inplace=False):
    """Reference of :func:`reft_kernels.ops.reft_edit`: hidden (B, T, d) with listed rows edited."""
    one = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
    return reft_edit_multi_reference(hidden, positions, None, one(proj), one(weight), one(bias),
                                     one(proj_bias), variant=variant, act=act, dropout=dropout,
                                     seed=seed, inplace=inplace)


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
