"""The ReFT op: one parametrised low-rank edit with per-row adapters, shared by every backend.

Every variant edits selected hidden rows ``h`` (width d), each with the weights of its adapter, as

    s      = A(h) - C(h)                                  (an r-vector)
    A(h)   = act(W h + b)      if the variant has W        (LoReFT, NoReFT, DiReFT, NodiReFT)
           = b                 otherwise                   (ConsReFT, LobiReFT)
    C(h)   = P h + c           if the variant subtracts P h (LoReFT, NoReFT, ConsReFT; c only NoReFT)
           = 0                 otherwise                   (DiReFT, NodiReFT, LobiReFT)
    Phi(h) = dropout(h + P^T s)                            (dropout on the whole edited row)

P (r x d) is the rotation R (orthonormal rows) for the Lo/Di/Cons/Lobi variants and the free
projection W2 for No/Nodi; W (r x d), b (r) are pyreft's ``learned_source``; c (r) is NoReFT's
projection bias. These are exactly the formulas of pyreft 0.1.0's ``interventions.py``.

Backward, with g the upstream gradient of a selected row and m/(1-p) its dropout scale:

    g'     = g * m / (1 - p)
    u      = P g'                          (r)
    v      = u * act'(W h + b)             (r, variants with W)
    grad_h = g' + W^T v - [C] P^T u        (selected rows; every other row gets g unchanged)
    grad_P = sum_rows s g'^T - [C] u h^T
    grad_W = sum_rows v h^T,   grad_b = sum_rows v  (with W)  or  sum_rows u  (without W)
    grad_c = -sum_rows u

(each sum over the rows of one adapter, into that adapter's gradients).

Adapters. A adapters of one variant are stacked along a leading axis: P, W (A, r_max, d) and b,
c (A, r_max); the single-adapter op is A = 1. An adapter of rank r_a < r_max fills rows
0..r_a-1 of its slice; the rows r_a..r_max-1 of ``P[a]`` must be zero (then its edit is exact
for any activation, since the edit is P^T s) and should be zero in W, b, c (then every padded
gradient row is zero except grad_P's, act(0) * sum g'^T, nonzero only for sigmoid; ``ranks``
masks it, see :func:`rank_mask`).

Conventions shared by all backends:
  * rows are addressed as flat indices ``b * T + t`` into a (B*T, d) view; ``-1`` means "skip";
  * :func:`canonical_rows` sorts each batch row's positions and turns duplicates into ``-1``,
    so a position listed twice is edited (and differentiated) once;
  * :func:`entry_adapters` gives each flat entry its adapter's stack index (0 for skips);
    :func:`adapter_segments` orders the entries by adapter for the per-adapter reductions;
  * dropout keeps element ``(row, col)`` iff ``philox(seed, row * d + col) >> 8 >= threshold``
    with ``threshold = floor(p * 2**24)``; the mask is a pure function of (seed, row, col), so it
    is identical across backends, in forward and backward, and is never stored;
  * arithmetic is in fp32 (fp64 for fp64 inputs); results are cast back to each tensor's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "EditSpec", "VARIANTS", "ACTIVATIONS", "canonical_rows", "entry_adapters", "adapter_segments",
    "rank_mask", "dropout_threshold",
    "philox_randint", "dropout_keep_mask", "activation", "activation_grad", "compute_dtype",
]

# Activations every backend implements (pyreft accepts any ACT2FN name; these cover its use).
# Aliases follow transformers' ACT2FN names.
ACTIVATIONS = {
    None: "linear", "linear": "linear", "identity": "linear",
    "relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu",
    "tanh": "tanh", "sigmoid": "sigmoid",
}
ACT_IDS = {"linear": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5}


@dataclass(frozen=True)
class EditSpec:
    """Which terms of the family formula a variant uses (see the module docstring)."""

    name: str
    has_weight: bool       # A(h) = act(W h + b)  (else A(h) = b)
    subtract_proj: bool    # C(h) = P h (+ c)
    has_dropout: bool = True

    def act_name(self, act) -> str:
        return resolve_activation(act) if self.has_weight else "linear"


VARIANTS = {
    "loreft": EditSpec("loreft", has_weight=True, subtract_proj=True),
    "noreft": EditSpec("noreft", has_weight=True, subtract_proj=True),
    "direft": EditSpec("direft", has_weight=True, subtract_proj=False),
    "nodireft": EditSpec("nodireft", has_weight=True, subtract_proj=False),
    "consreft": EditSpec("consreft", has_weight=False, subtract_proj=True, has_dropout=False),
    "lobireft": EditSpec("lobireft", has_weight=False, subtract_proj=False),
}


def resolve_activation(act) -> str:
    if callable(act) and not isinstance(act, str):
        raise TypeError(
            f"act={act!r}: pass the activation by name, one of {sorted(k for k in ACTIVATIONS if k)}"
            " (the fused kernels need its derivative)")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"act={act!r} is not supported; use one of {sorted(k for k in ACTIVATIONS if k)} or None")
    return ACTIVATIONS[act]


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for the oracle and gradcheck); every other dtype computes in fp32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# activations (used by the torch paths; the kernels implement the same formulas)
# --------------------------------------------------------------------------------------------
def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "linear":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz."""
    if name == "linear":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":  # exact (erf) gelu: Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    if name == "silu":
        sg = torch.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))
    if name == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if name == "sigmoid":
        sg = torch.sigmoid(z)
        return sg * (1.0 - sg)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------
def canonical_rows(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, P) positions -> (B*P,) int64 flat row indices ``b*T + t``; pads and duplicates -> -1.

    Each batch row's positions are sorted, so the result is a set per batch row: a position
    listed twice is edited once. Pure tensor ops: no host sync. With no tokens (``seq_len == 0``)
    every position is -1 (inputs.check_inputs) and nothing is selected: the result is empty, so every
    backend takes its N = 0 path on empty inputs.
    """
    if positions.numel() == 0 or seq_len == 0:
        return positions.new_empty((0,), dtype=torch.int64)
    pos = positions.to(torch.int64).sort(dim=1).values
    dup = torch.zeros_like(pos, dtype=torch.bool)
    dup[:, 1:] = pos[:, 1:] == pos[:, :-1]
    base = torch.arange(pos.shape[0], device=pos.device, dtype=torch.int64).unsqueeze(1) * seq_len
    rows = torch.where((pos >= 0) & ~dup, pos + base, torch.full_like(pos, -1))
    return rows.reshape(-1)


def entry_adapters(rows: torch.Tensor, stack_ids, n_positions: int):
    """(rows with adapter-less batch rows set to -1, each entry's adapter stack index (0 for skips)).

    ``rows`` is canonical_rows' (B * P,) output (entry i belongs to batch row i // P);
    ``stack_ids`` (B,) holds each batch row's stack index (-1: no adapter), or is None when
    every batch row uses adapter 0 (the single-adapter op).
    """
    if stack_ids is None or rows.numel() == 0:
        return rows, torch.zeros_like(rows)
    ids = stack_ids.to(torch.int64).repeat_interleave(n_positions)
    rows = torch.where(ids >= 0, rows, torch.full_like(rows, -1))
    return rows, ids.clamp(min=0)


def adapter_segments(rows: torch.Tensor, adapter: torch.Tensor, n_adapters: int):
    """Entries ordered by adapter: ``order`` (N,) and ``starts`` (A + 1,), both int64.

    ``order[starts[a]:starts[a+1]]`` are adapter a's live entries in their original order (a
    stable sort); skipped entries (rows = -1) come last, after ``starts[A]``. No host sync. With
    one adapter nothing is sorted: every entry is in adapter 0's segment (skips included; the
    kernels give them zero weight).
    """
    if n_adapters == 1:
        n = rows.numel()
        return (torch.arange(n, device=rows.device),
                torch.tensor([0, n], dtype=torch.int64, device=rows.device))
    key = torch.where(rows >= 0, adapter, torch.full_like(adapter, n_adapters))
    sorted_key, order = torch.sort(key, stable=True)
    starts = torch.searchsorted(sorted_key, torch.arange(n_adapters + 1, device=rows.device))
    return order, starts


def rank_mask(ranks: torch.Tensor, r_max: int, dtype) -> torch.Tensor:
    """(A, r_max) mask, 1 on each adapter's first ``ranks[a]`` rows, 0 on its padding."""
    return (torch.arange(r_max, device=ranks.device)[None, :] < ranks[:, None]).to(dtype)


# --------------------------------------------------------------------------------------------
# dropout: Philox4x32-10, bit-identical to triton.language.randint(seed, offset)
# --------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _umulhi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) & M32 for a python uint32 and an int64 tensor of uint32 values."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo, p_hi = a * b_lo, a * b_hi           # each < 2**48, no int64 overflow
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """uint32 values (in int64) equal to ``tl.randint(seed, offsets)`` for int64 offsets."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _umulhi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umulhi_lo(_PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """Keep an element iff its 24 high random bits are >= this threshold (keep prob ~ 1 - p)."""
    return int(float(p) * (1 << 24))


def dropout_keep_mask(seed: int, rows: torch.Tensor, d: int, p: float) -> torch.Tensor:
    """Boolean (N, d) keep-mask for flat rows (rows < 0 give arbitrary values, callers ignore them)."""
    offs = rows.to(torch.int64).clamp(min=0).unsqueeze(1) * d + torch.arange(d, device=rows.device)
    return (philox_randint(seed, offs) >> 8) >= dropout_threshold(p)


def new_seed(device: Optional[torch.device] = None) -> int:
    """Draw a dropout seed from torch's default CPU generator (no device sync; seeded by torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
