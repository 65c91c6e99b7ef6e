"""Autograd and backend dispatch of the ReFT op.

Every backend module (``torch_backend``, ``triton_backend``, ``native_backend``) implements the
same two row launchers over a flat (M = B*T, d) view, deduplicated flat ``rows`` (-1 = skip) and
each entry's adapter stack index ``adapter`` (N,) int64 (0 for skips), with the stacked weights
proj, weight (A, r, d) and bias, proj_bias (A, r):

    forward_rows(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed)
        -> saved (N, d); edits x2d in place at rows (entry n with adapter ``adapter[n]``'s
        weights) and returns the pre-edit rows (in x2d's dtype)
    backward_rows(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act, p, seed)
        -> (grad_proj (A, r, d), grad_weight | None, grad_bias (A, r), grad_proj_bias | None),
        fp32 (fp64 for fp64 inputs); edits grad2d (a private copy of the upstream gradient) in
        place at rows

The math each one implements is in :mod:`reft_kernels.ops.variants`. The launchers are wrapped
in two ``torch.library`` custom ops with fake (meta) implementations, and
:class:`ReftEditFunction` calls them, so ``torch.compile`` traces the op without graph breaks.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Tuple

import torch

from .variants import VARIANTS, canonical_rows, compute_dtype, entry_adapters, rank_mask

__all__ = ["ReftEditFunction", "resolve_backend", "get_backend", "BACKENDS"]

BACKENDS = ("torch", "triton", "native")
_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "native": "native_backend"}


def get_backend(name: str):
    """The backend module for ``name`` (imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is unknown; use one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return importlib.import_module(f".{_MODULES[name]}", __package__)


def _available(name: str, device: torch.device) -> bool:
    mod = get_backend_safely(name)
    if mod is None:
        return False
    check = getattr(mod, "is_available", None)
    return bool(check(device)) if check is not None else True


_warned = set()


@torch._dynamo.assume_constant_result  # a pure host-side choice: torch.compile need not trace it
def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` (or ``REFT_KERNELS_BACKEND``) into a concrete backend for ``device``.

    auto: Triton on CUDA when importable, then native, then torch; on CPU the native backend when
    it builds (faster than the eager path there, see benchmarks/), otherwise torch, with one
    warning. An explicit choice is honoured or fails with the reason. Resolved once per
    (backend, REFT_KERNELS_BACKEND, device type).
    """
    key = (backend, os.environ.get("REFT_KERNELS_BACKEND", ""), device.type)
    if key not in _resolved:
        _resolved[key] = _resolve(backend, device)
    return _resolved[key]


_resolved = {}


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        backend = os.environ.get("REFT_KERNELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        order = ("triton", "native", "torch") if device.type == "cuda" else ("native", "torch")
        for name in order:
            if _available(name, device):
                return name
            mod = get_backend_safely(name)
            if mod is not None and name != "torch" and (name, device.type) not in _warned:
                _warned.add((name, device.type))
                reason = getattr(mod, "unavailable_reason", lambda d: "unavailable")(device)
                warnings.warn(f"reft_kernels: {name} backend unavailable on {device.type} ({reason});"
                              " falling back", RuntimeWarning, stacklevel=3)
        return "torch"
    mod = get_backend(backend)
    check = getattr(mod, "is_available", None)
    if check is not None and not check(device):
        reason = getattr(mod, "unavailable_reason", lambda d: "unavailable")(device)
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def get_backend_safely(name):
    """The backend module, or None when it cannot be imported (an import failure = unavailable)."""
    try:
        return get_backend(name)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile, with fake implementations for tracing)
# --------------------------------------------------------------------------------------------
def _edit_rows_eager(x2d: torch.Tensor, rows: torch.Tensor, adapter: torch.Tensor,
                     proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
                     proj_bias: Optional[torch.Tensor], variant: str, act: str, p: float,
                     seed: int, backend: str) -> torch.Tensor:
    return get_backend(backend).forward_rows(x2d, rows, adapter, proj, weight, bias, proj_bias,
                                             VARIANTS[variant], act, p, seed)


# Eager calls go straight to the launchers (the custom-op dispatcher costs ~80 us a call);
# torch.compile sees these custom ops instead.
_edit_rows = torch.library.custom_op("reft_kernels::edit_rows_", _edit_rows_eager, mutates_args=("x2d",))


@_edit_rows.register_fake
def _(x2d, rows, adapter, proj, weight, bias, proj_bias, variant, act, p, seed, backend):
    return x2d.new_empty((rows.shape[0], x2d.shape[1]))


def _edit_rows_backward_eager(
        grad2d: torch.Tensor, rows: torch.Tensor, adapter: torch.Tensor, saved: torch.Tensor,
        proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
        proj_bias: Optional[torch.Tensor], variant: str, act: str, p: float, seed: int,
        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = get_backend(backend).backward_rows(grad2d, rows, adapter, saved, proj, weight, bias,
                                               proj_bias, VARIANTS[variant], act, p, seed)
    cd = compute_dtype(grad2d)
    return tuple(g if g is not None else grad2d.new_empty((0,), dtype=cd) for g in grads)


_edit_rows_backward = torch.library.custom_op("reft_kernels::edit_rows_backward_", _edit_rows_backward_eager,
                                              mutates_args=("grad2d",))


@_edit_rows_backward.register_fake
def _(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, variant, act, p, seed, backend):
    cd = compute_dtype(grad2d)
    A, r, d = proj.shape
    new = lambda *s: grad2d.new_empty(s, dtype=cd)  # noqa: E731
    return (new(A, r, d), new(A, r, d) if VARIANTS[variant].has_weight else new(0), new(A, r),
            new(A, r) if proj_bias is not None else new(0))


def _grad(g, like, needed, mask):
    """A weight gradient in the weight's dtype, zeroed at padded ranks when ``mask`` is given."""
    if not needed or like is None:
        return None
    if mask is not None:
        g = g * (mask if g.dim() == 2 else mask.unsqueeze(-1))
    return g.to(like.dtype)


class ReftEditFunction(torch.autograd.Function):
    """hidden (B, T, d) -> hidden with each batch row's listed rows edited by its own adapter.

    Saves the entries' rows and adapters (N,) and the N pre-edit rows, never the full hidden
    state. With ``inplace=True`` the input is modified in place and marked dirty. ``ranks``
    (A,) or None: zero the padded rank rows of the weight gradients.
    """

    @staticmethod
    def forward(ctx, hidden, positions, stack_ids, proj, weight, bias, proj_bias, ranks, variant,
                act, p, seed, inplace, backend):
        B, T, d = hidden.shape
        rows, adapter = entry_adapters(canonical_rows(positions, T), stack_ids, positions.shape[1])
        if inplace:
            out = hidden
            ctx.mark_dirty(hidden)
        else:
            out = hidden.clone(memory_format=torch.contiguous_format)
        edit = torch.ops.reft_kernels.edit_rows_ if torch.compiler.is_compiling() else _edit_rows_eager
        saved = edit(out.view(B * T, d), rows, adapter, proj, weight, bias, proj_bias, variant, act,
                     p, seed, backend)
        ctx.save_for_backward(rows, adapter, saved, proj, weight, bias, proj_bias, ranks)
        ctx.meta = (variant, act, p, seed, backend, (B, T, d))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, adapter, saved, proj, weight, bias, proj_bias, ranks = ctx.saved_tensors
        variant, act, p, seed, backend, (B, T, d) = ctx.meta
        need = ctx.needs_input_grad
        if need[0] or p:
            grad_hidden = grad_out.clone(memory_format=torch.contiguous_format)
            grad2d, grad_rows = grad_hidden.view(B * T, d), rows
        else:
            # hidden needs no gradient (e.g. the lowest edited layer of a frozen model) and no
            # dropout mask depends on the row index: work on the N gathered rows only.
            grad_hidden = None
            grad2d = grad_out.reshape(B * T, d).index_select(0, rows.clamp(min=0))
            local = torch.arange(rows.numel(), device=rows.device)
            grad_rows = torch.where(rows >= 0, local, torch.full_like(local, -1))
        edit_backward = (torch.ops.reft_kernels.edit_rows_backward_
                         if torch.compiler.is_compiling() else _edit_rows_backward_eager)
        gp, gw, gb, gc = edit_backward(grad2d, grad_rows, adapter, saved, proj, weight, bias,
                                       proj_bias, variant, act, p, seed, backend)
        mask = None if ranks is None else rank_mask(ranks, proj.shape[1], gp.dtype)
        return (grad_hidden if need[0] else None, None, None,
                _grad(gp, proj, need[3], mask), _grad(gw, weight, need[4], mask),
                _grad(gb, bias, need[5], mask), _grad(gc, proj_bias, need[6], mask),
                None, None, None, None, None, None, None)
