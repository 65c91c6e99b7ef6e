"""pyreft-compatible intervention modules, backed by the fused op family.

Each class keeps pyreft 0.1.0's name, constructor keywords, attribute layout and math (see
:mod:`reft_kernels.ops.family`); for gathered rows ``h`` (width d):

    LoreftIntervention     Phi(h) = dropout(h + R^T (act(W h + b) - R h))
    NoreftIntervention     Phi(h) = dropout(h + P^T (act(W h + b) - (P h + c)))
    DireftIntervention     Phi(h) = dropout(h + R^T act(W h + b))
    NodireftIntervention   Phi(h) = dropout(h + P^T act(W h + b))
    ConsreftIntervention   Phi(h) = h + R^T (b - R h)              (no dropout, as in pyreft)
    LobireftIntervention   Phi(h) = dropout(h + R^T b)

Attributes: ``learned_source`` is W, b (an ``nn.Linear(d, r)`` in ``dtype``) or, for Cons/Lobi, the
fp32 vector b (``torch.rand(r)`` init); ``proj_layer`` is P, c (No/Nodi; Nodi never uses c, as in
pyreft); ``rotate_layer`` is an :class:`OrthonormalRotation` whose ``.weight`` is R (r, d).

Differences from pyreft, all deliberate: ``train()``/``eval()`` switch dropout (pyreft's stay in
training mode); weights of another dtype than the hidden states are accepted (the math runs in
fp32); ``state_dict()`` is the ordinary one (pyreft's LoReFT override drops the prefix, so its
weights vanish from the parent's state dict); R is parametrised without a d x d buffer.
"""
from __future__ import annotations

import operator
import re
from typing import Optional

import torch
from torch import nn

from .ops import reft_edit
from .ops.family import VARIANTS, resolve_activation

__all__ = [
    "OrthonormalRotation", "ReftIntervention", "LoreftIntervention", "NoreftIntervention",
    "DireftIntervention", "NodireftIntervention", "ConsreftIntervention", "LobireftIntervention",
    "INTERVENTION_CLASSES", "intervention_class",
]

INTERVENTION_CLASSES: dict = {}


def intervention_class(name) -> type:
    """The intervention class for ``name``: a class, its name, or pyvene's ``str(type(iv))``."""
    if isinstance(name, type):
        return name
    words = re.findall(r"[A-Za-z_]\w*", str(name))
    short = words[-1] if words else ""
    if short not in INTERVENTION_CLASSES:
        raise ValueError(f"intervention type {name!r} is unknown; use one of {sorted(INTERVENTION_CLASSES)}")
    return INTERVENTION_CLASSES[short]


def _as_int(value) -> Optional[int]:
    """An int from an int-like value (int, numpy int, 0-d integer tensor such as pyvene's buffers)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_dtype(dtype) -> torch.dtype:
    """torch.bfloat16, "bfloat16" or "torch.bfloat16" -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise TypeError(f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'float32'")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the JSON form of a dtype)."""
    return str(dtype).replace("torch.", "")


class OrthonormalRotation(nn.Module):
    """R (r, d) with orthonormal rows, parametrised by an unconstrained fp32 ``basis`` (r, d):

        L = cholesky(basis basis^T)         (r x r, lower-triangular, positive diagonal)
        R = L^{-1} basis                    (a triangular solve)

    This is the Q factor of the QR decomposition ``basis^T = Q U`` with ``U = L^T`` (so with the
    sign convention diag(U) > 0), computed in fp64 and returned in fp32: one orthogonalisation of
    a d x r matrix per ``.weight`` access, nothing of size d x d, and no host sync on GPUs
    (``cholesky_ex`` does not check errors). R is orthonormal to fp32 rounding for any full-rank
    basis, whatever the optimiser does to ``basis``; the map is scale-invariant, so weight decay
    only rescales ``basis``. It is the identity on matrices with orthonormal rows, so
    :meth:`set_weight` sets R (to fp32 rounding) by copying it into ``basis``.

    pyreft instead wraps a (d, r) weight in ``torch.nn.utils.parametrizations.orthogonal``:
    ``R^T = base @ householder_product(original)`` with a d x d fp32 ``base`` buffer (64 MiB at
    d = 4096), recomputed three times per forward, and a diagonal cast with ``.int()`` that weight
    decay turns into R = 0. Both reach every orthonormal R, and the initial R is the same for the
    same seed: ``orthogonal_`` on a (d, r) matrix, then the (d, d - r) draw pyreft's
    parametrisation makes, so the RNG stream after construction matches pyreft's too.
    """

    def __init__(self, embed_dim: int, low_rank_dimension: int):
        super().__init__()
        init = torch.empty(embed_dim, low_rank_dimension)
        nn.init.orthogonal_(init)
        torch.randn(embed_dim, embed_dim - low_rank_dimension)  # pyreft's completion draw (RNG parity)
        self.basis = nn.Parameter(init.t().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """R (r, d), fp32, orthonormal rows; differentiable with respect to ``basis``."""
        basis = self.basis.double()
        chol, _ = torch.linalg.cholesky_ex(basis @ basis.t())
        return torch.linalg.solve_triangular(chol, basis, upper=False).float()

    @torch.no_grad()
    def set_weight(self, matrix: torch.Tensor, atol: float = 1e-4) -> None:
        """Set R from an orthonormal (r, d) matrix or pyreft's (d, r) ``rotate_layer`` weight."""
        r, d = self.basis.shape
        if tuple(matrix.shape) == (d, r) and d != r:
            matrix = matrix.t()
        if tuple(matrix.shape) != (r, d):
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}; pass R as ({r}, {d}) or pyreft's ({d}, {r})")
        matrix = matrix.to(device=self.basis.device, dtype=torch.float32)
        err = (matrix @ matrix.t() - torch.eye(r, device=matrix.device)).abs().max().item()
        if err > atol:
            raise ValueError(f"matrix is not orthonormal (max |R R^T - I| = {err:.2e} > {atol}); "
                             "pass a matrix with orthonormal rows (or columns for pyreft's (d, r))")
        self.basis.copy_(matrix)

    def extra_repr(self) -> str:
        r, d = self.basis.shape
        return f"embed_dim={d}, low_rank_dimension={r}"


class ReftIntervention(nn.Module):
    """Shared constructor, fused edit and pyvene-style forward of the six pyreft interventions.

    Subclasses set ``variant`` (a key of :data:`reft_kernels.ops.family.VARIANTS`) and implement
    :meth:`op_tensors`. Unknown constructor keywords are ignored, as in pyreft (``device``,
    ``layer``, ``component``, ``keep_last_dim``, ...).
    """

    variant = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            INTERVENTION_CLASSES[cls.__name__] = cls

    def __init__(self, embed_dim: int, low_rank_dimension: int, dtype=torch.bfloat16,
                 dropout: float = 0.0, act_fn: Optional[str] = None, **ignored):
        super().__init__()
        embed_dim = _as_int(embed_dim)
        if embed_dim is None or embed_dim <= 0:
            raise ValueError(f"embed_dim={embed_dim!r} must be a positive int (the model's hidden size)")
        low_rank_dimension = _as_int(low_rank_dimension)
        if low_rank_dimension is None or not 0 < low_rank_dimension <= embed_dim:
            raise ValueError(f"low_rank_dimension={low_rank_dimension!r} must be an int in [1, embed_dim={embed_dim}]")
        spec = VARIANTS[self.variant]
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.embed_dim = embed_dim
        self.low_rank_dimension = low_rank_dimension
        self.dtype = as_dtype(dtype)
        self.dropout_p = float(dropout) if spec.has_dropout else 0.0
        self.act_fn = act_fn if spec.has_weight else None
        if spec.has_weight:
            resolve_activation(act_fn)

    def op_tensors(self):
        """``(proj, weight, bias, proj_bias)`` as :func:`reft_kernels.ops.reft_edit` takes them."""
        raise NotImplementedError

    def config_kwargs(self) -> dict:
        """JSON-serialisable constructor keywords that rebuild this module (dtype as its name)."""
        source = getattr(self, "learned_source", None)
        dtype = source.weight.dtype if isinstance(source, nn.Linear) else self.dtype
        return {"embed_dim": self.embed_dim, "low_rank_dimension": self.low_rank_dimension,
                "dtype": dtype_name(dtype), "dropout": self.dropout_p,
                "act_fn": self.act_fn}

    def edit(self, hidden: torch.Tensor, positions: torch.Tensor, *, inplace: bool = False,
             backend: str = "auto", seed: Optional[int] = None) -> torch.Tensor:
        """Fast path: ``hidden`` (B, T, d) with rows ``positions`` (B, P; -1 = none) edited.

        Dropout is active only in training mode; ``seed`` fixes its mask (see ops.family).
        """
        proj, weight, bias, proj_bias = self.op_tensors()
        return reft_edit(hidden, positions, proj, weight, bias, proj_bias, variant=self.variant,
                         act=self.act_fn, dropout=self.dropout_p if self.training else 0.0,
                         seed=seed, inplace=inplace, backend=backend)

    def forward(self, base: torch.Tensor, source=None, subspaces=None, *,
                positions: Optional[torch.Tensor] = None, inplace: bool = False,
                backend: str = "auto", seed: Optional[int] = None) -> torch.Tensor:
        """pyvene's call on gathered rows ``base`` (B, n, d), every row edited; or, with
        ``positions``, :meth:`edit` of a full (B, T, d) tensor.

        The patcher uses the second form through ``__call__``, so module hooks that FSDP or
        DeepSpeed ZeRO-3 put on the intervention (parameter gathering) run. ``source`` and
        ``subspaces`` are ignored, as by every pyreft intervention.
        """
        if positions is None:
            if base.dim() != 3:
                raise ValueError(f"base must be the gathered rows of shape (B, n, d), got {tuple(base.shape)}")
            B, n, _ = base.shape
            positions = torch.arange(n, device=base.device).expand(B, n)
        return self.edit(base, positions, inplace=inplace, backend=backend, seed=seed)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, low_rank_dimension={self.low_rank_dimension}, "
                f"dropout={self.dropout_p}, act_fn={self.act_fn}")


class _RotatedWithSource(ReftIntervention):
    """R plus ``learned_source = nn.Linear(d, r)`` in ``dtype`` (LoReFT, DiReFT)."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn)
        self.rotate_layer = OrthonormalRotation(embed_dim, low_rank_dimension)
        self.learned_source = nn.Linear(embed_dim, low_rank_dimension).to(self.dtype)

    def op_tensors(self):
        return self.rotate_layer.weight, self.learned_source.weight, self.learned_source.bias, None


class _ProjectedWithSource(ReftIntervention):
    """Free projection ``proj_layer = nn.Linear(d, r, bias=add_bias)`` plus ``learned_source``."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, add_bias: bool = True, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn)
        self.add_bias = bool(add_bias)
        self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=self.add_bias).to(self.dtype)
        self.learned_source = nn.Linear(embed_dim, low_rank_dimension).to(self.dtype)

    def config_kwargs(self) -> dict:
        return {**super().config_kwargs(), "add_bias": self.add_bias}


class _RotatedConstant(ReftIntervention):
    """R plus a constant fp32 ``learned_source`` vector b (ConsReFT, LobiReFT)."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn)
        self.rotate_layer = OrthonormalRotation(embed_dim, low_rank_dimension)
        self.learned_source = nn.Parameter(torch.rand(low_rank_dimension))

    def op_tensors(self):
        return self.rotate_layer.weight, None, self.learned_source, None


class LoreftIntervention(_RotatedWithSource):
    """LoReFT: ``Phi(h) = dropout(h + R^T (act(W h + b) - R h))``."""

    variant = "loreft"


class DireftIntervention(_RotatedWithSource):
    """DiReFT: ``Phi(h) = dropout(h + R^T act(W h + b))`` (no ``- R h`` term)."""

    variant = "direft"


class NoreftIntervention(_ProjectedWithSource):
    """NoReFT: ``Phi(h) = dropout(h + P^T (act(W h + b) - (P h + c)))``, P = proj_layer (not orthogonal)."""

    variant = "noreft"

    def op_tensors(self):
        return (self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias,
                self.proj_layer.bias)


class NodireftIntervention(_ProjectedWithSource):
    """NodiReFT: ``Phi(h) = dropout(h + P^T act(W h + b))``; proj_layer.bias is unused, as in pyreft."""

    variant = "nodireft"

    def op_tensors(self):
        return self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias, None


class ConsreftIntervention(_RotatedConstant):
    """ConsReFT: ``Phi(h) = h + R^T (b - R h)`` (pyreft gives it no dropout; ``dropout`` is ignored)."""

    variant = "consreft"


class LobireftIntervention(_RotatedConstant):
    """LobiReFT: ``Phi(h) = dropout(h + R^T b)``."""

    variant = "lobireft"
