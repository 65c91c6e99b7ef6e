"""Completions of the rotation base: which fixed orthogonal d x d ``base`` carries R's trajectory.

The Householder parametrisation (see :mod:`reft_kernels.interventions.rotation`) writes ``R^T = base @ Q(A)``
with ``base[:, :r] = R_init`` and A the trainable reflector tails. Only ``base[:, :r]`` fixes the
initial R; the other d - r columns, the *completion*, fix which direction of the hidden space each
trainable entry A[i, j] (i >= r) moves R's row j along. Adam normalises every entry of A on its
own, so the completion changes the trajectory and what the edit learns (issue 20: the emoji quick
start's unseen prompts). Three completions, all with the same ``base[:, :r]``; the default is
``"pyreft"``, chosen by the quick start's held-out measure (benchmarks/results/
quickstart_generalisation.md: unseen emoji-only answers per seed, pyreft 0.1.0 3.4 +- 1.7 of 10,
``"pyreft"`` 3.0 +- 1.2, ``"hartley"`` 2.0 +- 2.1, ``"compact"`` 1.8 +- 1.5); the other two are
opt-in for memory-bound large d:

* ``"compact"``: ``base = B_c = H_1 ... H_r diag(t, 1, ..., 1)``, the r reflectors of R_init
  (O(d r) state). Away from R_init's span B_c is close to the identity, so A's entries move R
  along the model's own hidden-state axes (outlier dimensions included).
* ``"hartley"``: ``base = B_c @ blockdiag(I_r, S)`` with the structured random orthogonal
  ``S = P H D`` on the last m = d - r coordinates: D a random-sign diagonal, H the orthonormal
  discrete Hartley transform ``H_kj = cas(2 pi k j / m) / sqrt(m)`` (``cas = cos + sin``;
  symmetric, ``H H = I``, applied with an FFT: ``H x = (Re F x - Im F x) / sqrt(m)``), P a
  random permutation. Every entry of H has magnitude <= sqrt(2 / m), so each completion column
  is spread over all hidden axes, as in pyreft's random completion, with O(d) state: D and P are
  regenerated from one stored seed. ``base @ Q = B_c @ [Q[:r]; S Q[r:]]``: O(d log d r) extra.
* ``"pyreft"`` (the default): pyreft's own d x d completion (QR of ``[R_init, randn(d, d - r)]``):
  pyreft's exact path from the same seed, d x d floats of state (1.3 MiB at d = 576, 64 MiB at
  d = 4096, saved in checkpoints).

The hartley seed comes from the same (d, d - r) randn draw pyreft makes for its completion (its
first two floats' bits), so the global RNG stream stays in step with pyreft's.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["COMPACT", "HARTLEY", "PYREFT", "COMPLETIONS", "DEFAULT_COMPLETION", "resolve_completion",
           "seed_from_draw", "hartley_factors", "hartley_mix", "complete_columns"]

COMPACT, HARTLEY, PYREFT = "compact", "hartley", "pyreft"
COMPLETIONS = (COMPACT, HARTLEY, PYREFT)
DEFAULT_COMPLETION = PYREFT


def resolve_completion(completion, pyreft_base=None) -> str:
    """The completion named by ``completion`` and the older ``pyreft_base`` flag: both None give
    :data:`DEFAULT_COMPLETION`; ``pyreft_base=True`` means ``"pyreft"``, ``False`` the light
    ``"compact"`` (what it meant before ``completion=``). Raises for an unknown name or a
    contradiction."""
    if completion is None:
        return DEFAULT_COMPLETION if pyreft_base is None else (PYREFT if pyreft_base else COMPACT)
    if completion not in COMPLETIONS:
        raise ValueError(f"completion={completion!r} is unknown; use one of {COMPLETIONS}")
    if pyreft_base is not None and bool(pyreft_base) != (completion == PYREFT):
        raise ValueError(f"pyreft_base={bool(pyreft_base)} contradicts completion={completion!r}: pass one of them")
    return completion


def seed_from_draw(fill: torch.Tensor) -> int:
    """A 31-bit seed from the bits of the first two floats of a randn draw (no RNG consumed)."""
    bits = fill.detach().reshape(-1)[:2].float().cpu().contiguous().view(torch.int32).tolist()
    if not bits:   # r = d: the draw is empty and there is nothing to complete
        return 0
    return (bits[0] * 1000003 + bits[-1]) & 0x7FFFFFFF


def hartley_factors(m: int, seed: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D's signs (m,) fp32 of +-1, P's permutation (m,) int64) for ``seed`` (a private generator)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    signs = torch.randint(0, 2, (m,), generator=gen).float() * 2 - 1
    perm = torch.randperm(m, generator=gen)
    return signs.to(device), perm.to(device)


def hartley_mix(x: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``S x = P H D x`` for x (m, k), along dim 0 (see the module doc); orthogonal, differentiable."""
    f = torch.fft.fft(x * signs.to(x.dtype).unsqueeze(-1), dim=0)
    return ((f.real - f.imag) / math.sqrt(x.shape[0]))[perm]


def complete_columns(q: torch.Tensor, factors) -> torch.Tensor:
    """``blockdiag(I_r, S) @ q`` for q (d, k), r = d - len(signs); ``factors`` None: q itself."""
    if factors is None or factors[0].numel() == 0:   # no completion, or r = d (nothing to complete)
        return q
    signs, perm = factors
    r = q.shape[0] - signs.shape[0]
    return torch.cat([q[:r], hartley_mix(q[r:], signs, perm)])
