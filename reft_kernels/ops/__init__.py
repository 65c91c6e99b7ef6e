"""Functional API of the fused ReFT op.

THE op is :func:`reft_edit_multi`: it takes a layer's hidden states ``hidden`` (B, T, d),
``positions`` (B, P) (entries in [0, T), or -1 for "no edit"), a stack of A adapters of one
variant (proj, weight (A, r, d); bias, proj_bias (A, r)) and ``stack_ids`` (B,), each batch
row's stack index (-1: untouched), and returns ``hidden`` with every listed (row, position)
edited by its row's adapter. :func:`reft_edit` and the six named functions below are that op
with one adapter (A = 1, 2-D weights). The math of all six variants is in
:mod:`reft_kernels.ops.variants`; in short, with P the rotation R (or NoReFT's projection), W/b
pyreft's ``learned_source`` and c NoReFT's projection bias:

    loreft    h + R^T (act(W h + b) - R h)
    noreft    h + P^T (act(W h + b) - (P h + c))
    direft    h + R^T act(W h + b)
    nodireft  h + P^T act(W h + b)
    consreft  h + R^T (b - R h)                 (no dropout, as in pyreft)
    lobireft  h + R^T b

followed by dropout on the whole edited row. Weights may have other dtypes than ``hidden``
(pyreft keeps R in fp32 and W, b in bf16): the math runs in fp32, results are written in
``hidden``'s dtype and gradients in each weight's dtype.

``backend``: ``"torch"`` (plain PyTorch, any device), ``"triton"`` (fused kernels; CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``"native"`` (csrc/ C++/CUDA, built on first use) or ``"auto"``.
The environment variable ``REFT_KERNELS_BACKEND`` overrides ``"auto"``.
``seed`` fixes the dropout mask (drawn from torch's CPU generator when None).
"""
from __future__ import annotations

from typing import Optional

import torch

from .autograd import BACKENDS, ReftEditFunction, resolve_backend
from .inputs import check_adapter_inputs, check_inputs, stack_adapters
from .variants import ACTIVATIONS, VARIANTS, new_seed

__all__ = ["reft_edit_multi", "reft_edit", "stack_adapters", "loreft", "noreft", "direft", "nodireft",
           "consreft", "lobireft", "VARIANTS", "ACTIVATIONS", "BACKENDS", "resolve_backend"]


def _spec(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _apply(spec, hidden, positions, stack_ids, proj, weight, bias, proj_bias, ranks, act,
           dropout, seed, inplace, backend):
    act_name = spec.act_name(act)
    dropout = float(dropout)
    if dropout and seed is None:
        seed = new_seed()
    name = resolve_backend(backend, hidden.device)
    return ReftEditFunction.apply(hidden, positions, stack_ids, proj, weight, bias, proj_bias,
                                  ranks, spec.name, act_name, dropout, int(seed or 0),
                                  bool(inplace), name)


def reft_edit_multi(hidden: torch.Tensor, positions: torch.Tensor, stack_ids: Optional[torch.Tensor],
                    proj: torch.Tensor, weight: Optional[torch.Tensor], bias: torch.Tensor,
                    proj_bias: Optional[torch.Tensor] = None, *, variant: str = "loreft", act=None,
                    dropout: float = 0.0, seed: Optional[int] = None, inplace: bool = False,
                    ranks: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """The ReFT op: edit each batch row with its own adapter from a stack of A adapters, in one call.

    For batch row b with ``a = stack_ids[b] >= 0``, every listed position t gets
    ``dropout(h + P_a^T (A_a(h) - C_a(h)))`` (adapter a's slice ``proj[a]``, ``weight[a]``,
    ``bias[a]``, ``proj_bias[a]``); rows with id -1 pass through untouched; ``stack_ids=None``
    gives every row adapter 0. Gradients of the stacked weights: each adapter's slice gets the
    sum over its own rows only (zeros for an adapter without rows).

    Shapes: hidden (B, T, d); positions (B, P) in [0, T) or -1; stack_ids (B,) in [-1, A)
    (stack indices, not adapter names); proj and weight (A, r_max, d); bias and proj_bias
    (A, r_max). Mixed ranks: zero-pad every adapter's rows r_a..r_max-1 (the padded rows of proj
    must be zero; :func:`stack_adapters` does it; see docs/multi_adapter_op.md). ``ranks`` (A,),
    optional, zeroes the gradients of padded rows (needed only for activations with
    act(0) != 0, i.e. sigmoid, or nonzero padding). ``act`` (an activation name, see
    ``ACTIVATIONS``), ``dropout``, ``seed``, ``inplace`` (edit ``hidden`` itself; it must be
    contiguous), ``backend``: shared by every stacked adapter.
    """
    spec = _spec(variant)
    check_inputs(spec, hidden, positions, stack_ids, proj, weight, bias, proj_bias, dropout,
                 inplace, ranks)
    return _apply(spec, hidden, positions, stack_ids, proj, weight, bias, proj_bias, ranks, act,
                  dropout, seed, inplace, backend)


def reft_edit(hidden: torch.Tensor, positions: torch.Tensor, proj: torch.Tensor,
              weight: Optional[torch.Tensor], bias: torch.Tensor,
              proj_bias: Optional[torch.Tensor] = None, *, variant: str = "loreft", act=None,
              dropout: float = 0.0, seed: Optional[int] = None, inplace: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """:func:`reft_edit_multi` with one adapter: proj, weight (r, d), bias, proj_bias (r,).

    The named functions below call it.
    """
    spec = _spec(variant)
    check_adapter_inputs(spec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace)
    return _apply(spec, hidden, positions, None, proj.unsqueeze(0),         # the A = 1 stack
                  None if weight is None else weight.unsqueeze(0), bias.unsqueeze(0),
                  None if proj_bias is None else proj_bias.unsqueeze(0), None, act, dropout, seed,
                  inplace, backend)


def loreft(hidden, positions, rotation, weight, bias, *, act=None, dropout=0.0, seed=None,
           inplace=False, backend="auto"):
    """LoReFT: ``h + R^T(act(W h + b) - R h)``; rotation R (r, d), weight W (r, d), bias b (r,)."""
    return reft_edit(hidden, positions, rotation, weight, bias, variant="loreft", act=act,
                     dropout=dropout, seed=seed, inplace=inplace, backend=backend)


def noreft(hidden, positions, proj_weight, weight, bias, proj_bias=None, *, act=None, dropout=0.0,
           seed=None, inplace=False, backend="auto"):
    """NoReFT: ``h + P^T(act(W h + b) - (P h + c))``; P (r, d) unconstrained, c optional (r,)."""
    return reft_edit(hidden, positions, proj_weight, weight, bias, proj_bias, variant="noreft",
                     act=act, dropout=dropout, seed=seed, inplace=inplace, backend=backend)


def direft(hidden, positions, rotation, weight, bias, *, act=None, dropout=0.0, seed=None,
           inplace=False, backend="auto"):
    """DiReFT: ``h + R^T act(W h + b)``."""
    return reft_edit(hidden, positions, rotation, weight, bias, variant="direft", act=act,
                     dropout=dropout, seed=seed, inplace=inplace, backend=backend)


def nodireft(hidden, positions, proj_weight, weight, bias, *, act=None, dropout=0.0, seed=None,
             inplace=False, backend="auto"):
    """NodiReFT: ``h + P^T act(W h + b)`` (pyreft creates but never uses a projection bias)."""
    return reft_edit(hidden, positions, proj_weight, weight, bias, variant="nodireft", act=act,
                     dropout=dropout, seed=seed, inplace=inplace, backend=backend)


def consreft(hidden, positions, rotation, bias, *, inplace=False, backend="auto"):
    """ConsReFT: ``h + R^T(b - R h)`` (no dropout, as in pyreft)."""
    return reft_edit(hidden, positions, rotation, None, bias, variant="consreft",
                     inplace=inplace, backend=backend)


def lobireft(hidden, positions, rotation, bias, *, dropout=0.0, seed=None, inplace=False,
             backend="auto"):
    """LobiReFT: ``h + R^T b``."""
    return reft_edit(hidden, positions, rotation, None, bias, variant="lobireft",
                     dropout=dropout, seed=seed, inplace=inplace, backend=backend)
