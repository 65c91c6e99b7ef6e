"""Per-row adapters: the stacked-weight layout, its validation and the per-entry adapter index.

``reft_edit_multi`` (see :mod:`reft_kernels.ops.multi`) applies the family formula of
:mod:`reft_kernels.ops.family` with a different adapter per batch row. A adapters of one variant
are stacked along a leading axis:

    proj   (A, r_max, d)     weight (A, r_max, d) or None
    bias   (A, r_max)        proj_bias (A, r_max) or None

and ``adapter_ids`` (B,) picks each batch row's adapter (-1: the row passes through untouched).
An adapter of rank r_a < r_max fills rows 0..r_a-1 of its slice; the rows r_a..r_max-1 of
``proj[a]`` must be zero (then its edit is exact for any activation, since the edit is P^T s) and
should be zero in ``weight``, ``bias``, ``proj_bias`` (then every padded gradient row is zero
except grad_P's, which is act(0) * sum g'^T: nonzero only for sigmoid; ``ranks`` masks it).

Backends see flat entries, as for the single-adapter op: ``rows`` (N,) from
:func:`~reft_kernels.ops.family.canonical_rows` (entry i belongs to batch row i // P), with the
rows of batch rows without an adapter turned into -1, and ``adapter`` (N,) int64, the adapter of
each entry (0 for skipped entries, so it is always a valid index). :func:`adapter_segments`
orders the entries by adapter for the backward's per-adapter reductions.
"""
from __future__ import annotations

import torch

from .family import EditSpec, check_inputs

__all__ = ["check_multi_inputs", "entry_adapters", "adapter_segments", "rank_mask", "stack_adapters"]


def _check_stack(name, t, shape, hidden, required=True):
    if t is None:
        if required:
            raise ValueError(f"{name} is required for this variant; pass a {shape} tensor")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (stacked adapters; A from proj, r_max from"
                         f" proj, d from hidden), got {tuple(t.shape)}")


def check_multi_inputs(spec: EditSpec, hidden, positions, adapter_ids, proj, weight, bias,
                       proj_bias, dropout, inplace, ranks=None) -> int:
    """Validate ``reft_edit_multi``'s arguments (ValueError/TypeError naming the argument); returns A.

    The per-adapter checks (dtypes, devices, positions) are those of
    :func:`~reft_kernels.ops.family.check_inputs`, run on adapter 0's slice (shapes of the whole
    stack are checked here). Ids are range-checked on the host for CPU tensors and with an
    asynchronous device assert elsewhere, as positions are.
    """
    if not isinstance(proj, torch.Tensor) or proj.dim() != 3:
        got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__
        raise ValueError(f"rotation/proj must be the stacked (A, r_max, d) tensor of the adapters, got {got}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        check_inputs(spec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace)
    A, r, d = proj.shape
    if A == 0:
        raise ValueError("rotation/proj stacks A=0 adapters; stack at least one (A, r_max, d)")
    if d != hidden.shape[2]:
        raise ValueError(f"rotation/proj must have shape (A, r_max, d) = ({A}, {r}, {hidden.shape[2]})"
                         f" to match hidden, got {tuple(proj.shape)}")
    _check_stack("weight", weight, (A, r, d), hidden, required=False)
    _check_stack("bias", bias, (A, r), hidden)
    _check_stack("proj_bias", proj_bias, (A, r), hidden, required=False)
    first = lambda t: None if t is None else t[0]  # noqa: E731
    check_inputs(spec, hidden, positions, proj[0], first(weight), first(bias), first(proj_bias),
                 dropout, inplace)

    B = hidden.shape[0]
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor of shape (B,) = ({B},),"
                        f" got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids has dtype {adapter_ids.dtype}; it must be int32 or int64."
                        " Use adapter_ids.long()")
    if tuple(adapter_ids.shape) != (B,):
        raise ValueError(f"adapter_ids must have shape (B,) = ({B},) (one id per batch row),"
                         f" got {tuple(adapter_ids.shape)}")
    if adapter_ids.device != hidden.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but hidden is on {hidden.device};"
                         f" use adapter_ids.to({str(hidden.device)!r})")
    _check_range("adapter_ids", adapter_ids, A, "use -1 for 'no adapter' and 0..A-1 for the stacked adapters")
    if ranks is not None:
        if not isinstance(ranks, torch.Tensor) or ranks.dtype not in (torch.int32, torch.int64) \
                or tuple(ranks.shape) != (A,):
            raise ValueError(f"ranks must be an integer tensor of shape (A,) = ({A},) (each adapter's"
                             f" true rank), got {ranks!r}")
        if ranks.device != hidden.device:
            raise ValueError(f"ranks is on {ranks.device} but hidden is on {hidden.device}")
        if ranks.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = ranks[(ranks < 0) | (ranks > r)]
            if bad.numel():
                raise ValueError(f"ranks contains {int(bad[0])}; each adapter's rank must be in"
                                 f" [0, r_max={r}] (r_max = proj.shape[1])")
        else:
            torch._assert_async(((ranks >= 0) & (ranks <= r)).all(), "reft_kernels: ranks out of range")
    return A


def _check_range(name, t, hi, fix):
    if not t.numel():
        return
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, top = int(t.min()), int(t.max())
        if lo < -1 or top >= hi:
            bad = lo if lo < -1 else top
            raise ValueError(f"{name} contains {bad}, outside [-1, {hi}); {fix}")
    else:
        torch._assert_async(((t >= -1) & (t < hi)).all(), f"reft_kernels: {name} out of range")


def entry_adapters(rows: torch.Tensor, adapter_ids: torch.Tensor, n_positions: int):
    """(rows with adapter-less batch rows set to -1, each entry's adapter index (0 for skips)).

    ``rows`` is canonical_rows' (B * P,) output (entry i belongs to batch row i // P).
    """
    if rows.numel() == 0:
        return rows, rows.new_empty((0,), dtype=torch.int64)
    ids = adapter_ids.to(torch.int64).repeat_interleave(n_positions)
    rows = torch.where(ids >= 0, rows, torch.full_like(rows, -1))
    return rows, ids.clamp(min=0)


def adapter_segments(rows: torch.Tensor, adapter: torch.Tensor, n_adapters: int):
    """Entries ordered by adapter: ``order`` (N,) and ``starts`` (A + 1,), both int64.

    ``order[starts[a]:starts[a+1]]`` are adapter a's live entries in their original order (a
    stable sort); skipped entries (rows = -1) come last, after ``starts[A]``. No host sync.
    """
    key = torch.where(rows >= 0, adapter, torch.full_like(adapter, n_adapters))
    sorted_key, order = torch.sort(key, stable=True)
    starts = torch.searchsorted(sorted_key, torch.arange(n_adapters + 1, device=rows.device))
    return order, starts


def rank_mask(ranks: torch.Tensor, r_max: int, dtype) -> torch.Tensor:
    """(A, r_max) mask, 1 on each adapter's first ``ranks[a]`` rows, 0 on its padding."""
    return (torch.arange(r_max, device=ranks.device)[None, :] < ranks[:, None]).to(dtype)


def _pad_rows(t: torch.Tensor, r_max: int) -> torch.Tensor:
    pad = r_max - t.shape[0]
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, pad) if t.dim() == 2 else (0, pad))


def stack_adapters(adapters):
    """Stack per-adapter weights for ``reft_edit_multi``, zero-padding every rank to r_max.

    ``adapters``: a sequence of ``(proj, weight, bias, proj_bias)`` tuples, one per adapter
    (proj, weight (r_a, d); bias, proj_bias (r_a,); weight / proj_bias None for every adapter or
    for none). Returns ``(proj, weight, bias, proj_bias, ranks)`` with proj, weight
    (A, r_max, d), bias, proj_bias (A, r_max) and ranks (A,) int64. Differentiable
    (``torch.stack`` of zero-padded tensors): a loss on the op's output trains each adapter's own
    parameters, and the padding's gradient is discarded by the stacking. Weights keep their
    dtype (all adapters must share it per tensor kind) and device.
    """
    adapters = [tuple(a) for a in adapters]
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
    if any(len(a) != 4 for a in adapters):
        raise ValueError("each adapter must be a (proj, weight, bias, proj_bias) tuple")
    ranks = [a[0].shape[0] for a in adapters]
    r_max = max(ranks)
    out = []
    for i, name in enumerate(("proj", "weight", "bias", "proj_bias")):
        parts = [a[i] for a in adapters]
        present = [p is not None for p in parts]
        if not any(present):
            out.append(None)
            continue
        if not all(present):
            raise ValueError(f"{name} is None for some adapters and not for others; adapters"
                             " stacked together must be of the same variant")
        out.append(torch.stack([_pad_rows(p, r_max) for p in parts]))
    device = adapters[0][0].device
    return (*out, torch.tensor(ranks, dtype=torch.int64, device=device))
