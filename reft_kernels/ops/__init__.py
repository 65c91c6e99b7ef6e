"""Functional API of the fused ReFT op family.

Each function takes a layer's hidden states ``hidden`` (B, T, d) and ``positions`` (B, P) (entries
in [0, T), or -1 for "no edit") and returns ``hidden`` with every listed (row, position) edited.
The math of all six variants is in :mod:`reft_kernels.ops.family`; in short, with P the rotation
R (or NoReFT's projection), W/b pyreft's ``learned_source`` and c NoReFT's projection bias:

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

:func:`reft_edit_multi` is the same op over a stack of A adapters with one adapter id per batch
row (per-row adapters in one fused call; see :mod:`reft_kernels.ops.multi`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .autograd import BACKENDS, ReftEditFunction, resolve_backend
from .family import ACTIVATIONS, VARIANTS, check_inputs, new_seed
from .multi import reft_edit_multi
from .multi_family import stack_adapters

__all__ = ["reft_edit", "reft_edit_multi", "stack_adapters", "loreft", "noreft", "direft", "nodireft", "consreft", "lobireft",
           "VARIANTS", "ACTIVATIONS", "BACKENDS", "resolve_backend"]


def reft_edit(hidden: torch.Tensor, positions: torch.Tensor, proj: torch.Tensor,
              weight: Optional[torch.Tensor], bias: torch.Tensor,
              proj_bias: Optional[torch.Tensor] = None, *, variant: str = "loreft", act=None,
              dropout: float = 0.0, seed: Optional[int] = None, inplace: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """Generic entry point of the family; the named functions below call it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    check_inputs(spec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace)
    act_name = spec.act_name(act)
    dropout = float(dropout)
    if dropout and seed is None:
        seed = new_seed()
    name = resolve_backend(backend, hidden.device)
    return ReftEditFunction.apply(hidden, positions, proj, weight, bias, proj_bias, variant,
                                  act_name, dropout, int(seed or 0), bool(inplace), name)


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
