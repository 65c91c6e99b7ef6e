"""The ReFT op family: one parametrised low-rank edit, shared by every backend.

Every member edits selected hidden rows ``h`` (width d) as

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

Conventions shared by all backends:
  * rows are addressed as flat indices ``b * T + t`` into a (B*T, d) view; ``-1`` means "skip";
  * :func:`canonical_rows` sorts each batch row's positions and turns duplicates into ``-1``,
    so a position listed twice is edited (and differentiated) once;
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
    "EditSpec", "VARIANTS", "ACTIVATIONS", "canonical_rows", "check_inputs", "dropout_threshold",
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
    every position is -1 (check_inputs) and nothing is selected: the result is empty, so every
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


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
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


def check_inputs(spec: EditSpec, hidden, positions, proj, weight, bias, proj_bias, dropout, inplace):
    """Validate the functional API's arguments; raises ValueError/TypeError naming the argument.

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
