"""Per-row adapters in one fused call: ``reft_edit_multi`` and its autograd wrapper.

Every backend module implements, next to the single-adapter launchers of
:mod:`reft_kernels.ops.autograd`, the same contract with a stacked adapter axis:

    forward_rows_multi(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed)
        -> saved (N, d); edits x2d in place at rows, entry n with adapter ``adapter[n]``'s weights
    backward_rows_multi(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act, p,
                        seed) -> (grad_proj (A, r, d), grad_weight | None, grad_bias (A, r),
                                  grad_proj_bias | None), fp32 (fp64 for fp64 inputs)

with ``proj`` (A, r, d) etc. and ``adapter`` (N,) from
:func:`~reft_kernels.ops.multi_family.entry_adapters`. The math and the padding rule are in
:mod:`reft_kernels.ops.multi_family` and docs/multi_adapter_op.md. The launchers are wrapped in
``torch.library`` custom ops with fake implementations, as the single-adapter ones are.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .autograd import get_backend, resolve_backend
from .family import VARIANTS, canonical_rows, compute_dtype, new_seed
from .multi_family import check_multi_inputs, entry_adapters, rank_mask

__all__ = ["reft_edit_multi", "ReftEditMultiFunction"]


def _edit_rows_multi_eager(x2d: torch.Tensor, rows: torch.Tensor, adapter: torch.Tensor,
                           proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
                           proj_bias: Optional[torch.Tensor], variant: str, act: str, p: float,
                           seed: int, backend: str) -> torch.Tensor:
    return get_backend(backend).forward_rows_multi(x2d, rows, adapter, proj, weight, bias,
                                                   proj_bias, VARIANTS[variant], act, p, seed)


_edit_rows_multi = torch.library.custom_op("reft_kernels::edit_rows_multi_", _edit_rows_multi_eager,
                                           mutates_args=("x2d",))


@_edit_rows_multi.register_fake
def _(x2d, rows, adapter, proj, weight, bias, proj_bias, variant, act, p, seed, backend):
    return x2d.new_empty((rows.shape[0], x2d.shape[1]))


def _edit_rows_multi_backward_eager(
        grad2d: torch.Tensor, rows: torch.Tensor, adapter: torch.Tensor, saved: torch.Tensor,
        proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
        proj_bias: Optional[torch.Tensor], variant: str, act: str, p: float, seed: int,
        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = get_backend(backend).backward_rows_multi(grad2d, rows, adapter, saved, proj, weight,
                                                     bias, proj_bias, VARIANTS[variant], act, p,
                                                     seed)
    cd = compute_dtype(grad2d)
    return tuple(g if g is not None else grad2d.new_empty((0,), dtype=cd) for g in grads)


_edit_rows_multi_backward = torch.library.custom_op(
    "reft_kernels::edit_rows_multi_backward_", _edit_rows_multi_backward_eager,
    mutates_args=("grad2d",))


@_edit_rows_multi_backward.register_fake
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


class ReftEditMultiFunction(torch.autograd.Function):
    """hidden (B, T, d) -> hidden with each batch row's listed rows edited by its own adapter.

    Saves the entries' rows and adapters (N,) and the N pre-edit rows, never the full hidden.
    """

    @staticmethod
    def forward(ctx, hidden, positions, adapter_ids, proj, weight, bias, proj_bias, ranks, variant,
                act, p, seed, inplace, backend):
        B, T, d = hidden.shape
        rows, adapter = entry_adapters(canonical_rows(positions, T), adapter_ids, positions.shape[1])
        if inplace:
            out = hidden
            ctx.mark_dirty(hidden)
        else:
            out = hidden.clone(memory_format=torch.contiguous_format)
        edit = (torch.ops.reft_kernels.edit_rows_multi_ if torch.compiler.is_compiling()
                else _edit_rows_multi_eager)
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
        else:  # as ReftEditFunction: only the N gathered rows (no mask depends on the row index)
            grad_hidden = None
            grad2d = grad_out.reshape(B * T, d).index_select(0, rows.clamp(min=0))
            local = torch.arange(rows.numel(), device=rows.device)
            grad_rows = torch.where(rows >= 0, local, torch.full_like(local, -1))
        edit_backward = (torch.ops.reft_kernels.edit_rows_multi_backward_
                         if torch.compiler.is_compiling() else _edit_rows_multi_backward_eager)
        gp, gw, gb, gc = edit_backward(grad2d, grad_rows, adapter, saved, proj, weight, bias,
                                       proj_bias, variant, act, p, seed, backend)
        mask = None if ranks is None else rank_mask(ranks, proj.shape[1], gp.dtype)
        return (grad_hidden if need[0] else None, None, None,
                _grad(gp, proj, need[3], mask), _grad(gw, weight, need[4], mask),
                _grad(gb, bias, need[5], mask), _grad(gc, proj_bias, need[6], mask),
                None, None, None, None, None, None, None)


def reft_edit_multi(hidden: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor,
                    proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
                    proj_bias: Optional[torch.Tensor] = None, *, variant: str = "loreft", act=None,
                    dropout: float = 0.0, seed: Optional[int] = None, inplace: bool = False,
                    ranks: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Edit each batch row with its own adapter from a stack of A adapters, in one fused call.

    For batch row b with ``a = adapter_ids[b] >= 0``, every listed position t gets
    ``dropout(h + P_a^T (A_a(h) - C_a(h)))`` (the formula of :func:`reft_edit` with adapter a's
    slice ``proj[a]``, ``weight[a]``, ``bias[a]``, ``proj_bias[a]``); rows with id -1 pass
    through untouched. Gradients of the stacked weights: each adapter's slice gets the sum over
    its own rows only (zeros for an adapter without rows).

    Shapes: hidden (B, T, d); positions (B, P) in [0, T) or -1; adapter_ids (B,) in [-1, A);
    proj and weight (A, r_max, d); bias and proj_bias (A, r_max). Mixed ranks: zero-pad every
    adapter's rows r_a..r_max-1 (the padded rows of proj must be zero; see
    docs/multi_adapter_op.md). ``ranks`` (A,), optional, zeroes the gradients of padded rows
    (needed only for activations with act(0) != 0, i.e. sigmoid, or nonzero padding).
    ``act``, ``dropout``, ``seed``, ``inplace``, ``backend``: as :func:`reft_edit`, shared by
    every stacked adapter.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    check_multi_inputs(spec, hidden, positions, adapter_ids, proj, weight, bias, proj_bias,
                       dropout, inplace, ranks)
    act_name = spec.act_name(act)
    dropout = float(dropout)
    if dropout and seed is None:
        seed = new_seed()
    name = resolve_backend(backend, hidden.device)
    return ReftEditMultiFunction.apply(hidden, positions, adapter_ids, proj, weight, bias,
                                       proj_bias, ranks, variant, act_name, dropout,
                                       int(seed or 0), bool(inplace), name)
