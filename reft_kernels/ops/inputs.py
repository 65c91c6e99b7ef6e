"""Argument checks of the ReFT op, and the stacking of per-adapter weights into its layout.

:func:`check_inputs` validates every argument of :func:`reft_kernels.ops.reft_edit_multi` (the
stacked layout of :mod:`reft_kernels.ops.variants`) and raises ValueError/TypeError naming the
argument, the bad value and the fix; :func:`stack_adapters` builds that layout from per-adapter
``(proj, weight, bias, proj_bias)`` tuples.
"""
from __future__ import annotations

import torch

from .variants import EditSpec

__all__ = ["check_inputs", "check_adapter_inputs", "stack_adapters"]

_FLOAT_HIDDEN = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_matrix(name, t, r, d, hidden):
    if t is None:
        raise ValueError(f"{name} is required for this variant; pass a ({r}, {d}) tensor")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; it must be floating point (fp32, bf16 or fp16)")
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it with .to({str(hidden.device)!r})")


def check_adapter_inputs(spec: EditSpec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace):
    """Validate one adapter's (2-D) arguments; raises ValueError/TypeError naming the argument.

    Positions are range-checked on the host for CPU tensors. For CUDA tensors (and under
    ``torch.compile``) the check is an asynchronous device assert (``torch._assert_async``), so it
    adds no host sync per call.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor of shape (B, T, d), got {type(hidden).__name__}")
    if hidden.dtype not in _FLOAT_HIDDEN:
        raise TypeError(
            f"hidden has dtype {hidden.dtype}; it must be float32, bfloat16 or float16 (float64 for checks)."
            " Cast it with hidden.float()")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, d), got shape {tuple(hidden.shape)}")
    B, T, d = hidden.shape
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor of shape (B, P), got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions has dtype {positions.dtype}; it must be int32 or int64. Use positions.long()")
    if positions.dim() != 2 or positions.shape[0] != B:
        raise ValueError(
            f"positions must have shape (B, P) = ({B}, P) to match hidden, got {tuple(positions.shape)}")
    if positions.device != hidden.device:
        raise ValueError(
            f"positions is on {positions.device} but hidden is on {hidden.device}; build it there or"
            f" use positions.to({str(hidden.device)!r})")
    if inplace and not hidden.is_contiguous():
        raise ValueError("inplace=True needs a contiguous hidden tensor; call hidden.contiguous() or use inplace=False")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    if dropout and not spec.has_dropout:
        raise ValueError(f"{spec.name} has no dropout (as in pyreft); pass dropout=0.0")

    r = proj.shape[0] if isinstance(proj, torch.Tensor) and proj.dim() == 2 else None
    _check_matrix("rotation/proj", proj, "r", d, hidden)
    if proj.dim() != 2 or proj.shape[1] != d:
        raise ValueError(f"rotation/proj must have shape (r, d) = (r, {d}) to match hidden, got {tuple(proj.shape)}")
    if spec.has_weight:
        _check_matrix("weight", weight, r, d, hidden)
        if tuple(weight.shape) != (r, d):
            raise ValueError(
                f"weight must have shape (r, d) = ({r}, {d}) to match rotation/proj and hidden,"
                f" got {tuple(weight.shape)}")
    elif weight is not None:
        raise ValueError(f"{spec.name} takes no weight; pass weight=None")
    if bias is None:
        raise ValueError(f"bias is required for {spec.name}; pass a ({r},) tensor")
    _check_matrix("bias", bias, r, d, hidden)
    if tuple(bias.shape) != (r,):
        raise ValueError(f"bias must have shape (r,) = ({r},), got {tuple(bias.shape)}")
    if proj_bias is not None:
        if not spec.subtract_proj:
            raise ValueError(f"{spec.name} does not subtract P h, so proj_bias must be None")
        _check_matrix("proj_bias", proj_bias, r, d, hidden)
        if tuple(proj_bias.shape) != (r,):
            raise ValueError(f"proj_bias must have shape (r,) = ({r},), got {tuple(proj_bias.shape)}")

    if positions.numel():
        if positions.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(positions.min()), int(positions.max())
            if lo < -1 or hi >= T:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"positions contains {bad}, outside [-1, {T}) for a sequence of length T={T};"
                    " use -1 for 'no edit' and indices 0..T-1 for tokens")
        else:
            torch._assert_async(((positions >= -1) & (positions < T)).all(),
                                "reft_kernels: positions outside [-1, T)")


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


def check_inputs(spec: EditSpec, hidden, positions, stack_ids, proj, weight, bias, proj_bias,
                 dropout, inplace, ranks=None) -> int:
    """Validate ``reft_edit_multi``'s arguments (ValueError/TypeError naming the argument); returns A.

    The per-adapter checks (dtypes, devices, positions) are :func:`check_adapter_inputs`, run on
    adapter 0's slice (shapes of the whole stack are checked here). ``stack_ids`` None means
    every batch row uses adapter 0 (the single-adapter op). Ids are range-checked on the host
    for CPU tensors and with an asynchronous device assert elsewhere, as positions are.
    """
    if not isinstance(proj, torch.Tensor) or proj.dim() != 3:
        got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__
        raise ValueError(f"rotation/proj must be the stacked (A, r_max, d) tensor of the adapters, got {got}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        check_adapter_inputs(spec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace)
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
    check_adapter_inputs(spec, hidden, positions, proj[0], first(weight), first(bias), first(proj_bias),
                         dropout, inplace)

    B = hidden.shape[0]
    if stack_ids is None:
        pass
    elif not isinstance(stack_ids, torch.Tensor):
        raise TypeError(f"stack_ids must be an integer torch.Tensor of shape (B,) = ({B},),"
                        f" got {type(stack_ids).__name__}")
    elif stack_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"stack_ids has dtype {stack_ids.dtype}; it must be int32 or int64."
                        " Use stack_ids.long()")
    elif tuple(stack_ids.shape) != (B,):
        raise ValueError(f"stack_ids must have shape (B,) = ({B},) (one id per batch row),"
                         f" got {tuple(stack_ids.shape)}")
    elif stack_ids.device != hidden.device:
        raise ValueError(f"stack_ids is on {stack_ids.device} but hidden is on {hidden.device};"
                         f" use stack_ids.to({str(hidden.device)!r})")
    else:
        _check_range("stack_ids", stack_ids, A, "use -1 for 'no adapter' and 0..A-1 for the stacked adapters")
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
