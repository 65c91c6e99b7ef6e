"""pyreft-compatible intervention modules, backed by the fused op family.

Each class keeps pyreft 0.1.0's name, constructor keywords, attribute layout and math (see
:mod:`reft_kernels.ops.variants`); for gathered rows ``h`` (width d):

    LoreftIntervention     Phi(h) = dropout(h + R^T (act(W h + b) - R h))
    NoreftIntervention     Phi(h) = dropout(h + P^T (act(W h + b) - (P h + c)))
    DireftIntervention     Phi(h) = dropout(h + R^T act(W h + b))
    NodireftIntervention   Phi(h) = dropout(h + P^T act(W h + b))
    ConsreftIntervention   Phi(h) = h + R^T (b - R h)              (no dropout, as in pyreft)
    LobireftIntervention   Phi(h) = dropout(h + R^T b)

Attributes: ``learned_source`` is W, b (an ``nn.Linear(d, r)`` in ``dtype``) or, for Cons/Lobi, the
fp32 vector b (``torch.rand(r)`` init); ``proj_layer`` is P, c (No/Nodi; Nodi never uses c, as in
pyreft); ``rotate_layer`` is an :class:`OrthonormalRotation` whose ``.weight`` is R (r, d),
parametrised as pyreft's (same optimisation trajectory) unless ``orthogonal_map="cholesky_qr"``.
``completion`` picks the rotation base's completion (:mod:`reft_kernels.interventions.completions`): the
default, ``"pyreft"``, is pyreft's random d x d one, so training from the same seed follows
pyreft's exact path; ``"compact"`` and ``"hartley"`` are lighter, opt-in. ``pyreft_base=True``
is ``completion="pyreft"`` plus, through the trainer, pyreft's data order (see
:mod:`reft_kernels.training.trainer`; the whole path also needs dropout 0 and weight decay 0);
``pyreft_base=False`` is ``"compact"``; ``None`` (the default) means what
:func:`set_pyreft_base_default` last set (:func:`reft_kernels.as_pyreft` sets True, or False with
``exact=False``), else leaves it to ``completion``.

``load_state_dict`` also takes pyreft 0.1.0's state dicts (LoReFT's slim ``{weight, bias,
rotate_layer}`` and every class's ``nn.Module`` dict with ``embed_dim``, ``interchange_dim`` and
``rotate_layer.parametrizations.weight.*``), also under a parent's prefix;
:meth:`ReftIntervention.pyreft_state_dict` gives pyreft's keys back.

Differences from pyreft, all deliberate: ``train()``/``eval()`` switch dropout (pyreft's stay in
training mode); weights of another dtype than the hidden states are accepted (the math runs in
fp32); ``state_dict()`` is the ordinary one (pyreft's LoReFT override drops the prefix, so its
weights vanish from the parent's state dict); with ``completion="compact"`` or ``"hartley"`` R
needs no d x d buffer.
"""
from __future__ import annotations

import operator
import re
from typing import Optional

import torch
from torch import nn

from .registry import TYPES, type_name
from ..ops import reft_edit
from ..ops.variants import VARIANTS, resolve_activation
from .pyreft_keys import from_pyreft, is_pyreft_state, to_pyreft
from .rotation import ORTHOGONAL_MAPS, OrthonormalRotation

__all__ = [
    "OrthonormalRotation", "ReftIntervention", "LoreftIntervention", "NoreftIntervention",
    "DireftIntervention", "NodireftIntervention", "ConsreftIntervention", "LobireftIntervention",
    "INTERVENTION_CLASSES", "intervention_class", "LowRankRotateLayer", "set_pyreft_base_default",
]

INTERVENTION_CLASSES: dict = {}   # class name -> module class (every public subclass)


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


class ReftIntervention(nn.Module):
    """Shared constructor, fused edit and pyvene-style forward of the six pyreft interventions.

    A subclass named like a record of :mod:`reft_kernels.interventions.registry` takes its op
    ``variant`` from it and implements :meth:`op_tensors`. Unknown constructor keywords are
    ignored, as in pyreft (``device``, ``layer``, ``component``, ``keep_last_dim``, ...).
    """

    variant = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__name__ in TYPES:
            cls.variant = TYPES[cls.__name__].variant
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

        Dropout is active only in training mode; ``seed`` fixes its mask (see ops.variants).
        """
        variant, act, dropout = self.op_settings()
        return reft_edit(hidden, positions, *self.op_tensors(), variant=variant, act=act,
                         dropout=dropout, seed=seed, inplace=inplace, backend=backend)

    def op_settings(self) -> tuple:
        """``(variant, act, dropout)`` the op runs this module's edit with (no dropout in eval)."""
        return self.variant, self.act_fn, self.dropout_p if self.training else 0.0

    def forward(self, base: torch.Tensor, source=None, subspaces=None, *,
                positions: Optional[torch.Tensor] = None, inplace: bool = False,
                backend: str = "auto", seed: Optional[int] = None, within=None) -> torch.Tensor:
        """pyvene's call on gathered rows ``base`` (B, n, d), every row edited; or, with
        ``positions``, :meth:`edit` of a full (B, T, d) tensor; or, with ``within``,
        ``within(base)`` (a stacked edit of several adapters runs its one op call inside every
        stacked module's call, see :class:`reft_kernels.model.plan.StackedEdit`).

        The patcher calls every intervention through ``__call__``, so module hooks that FSDP or
        DeepSpeed ZeRO-3 put on it (parameter gathering) run around its edit on every path.
        ``source`` and ``subspaces`` are ignored, as by every pyreft intervention.
        """
        if within is not None:
            return within(base)
        if positions is None:
            if base.dim() != 3:
                raise ValueError(f"base must be the gathered rows of shape (B, n, d), got {tuple(base.shape)}")
            B, n, _ = base.shape
            positions = torch.arange(n, device=base.device).expand(B, n)
        return self.edit(base, positions, inplace=inplace, backend=backend, seed=seed)

    def canonical_tensors(self) -> dict:
        """Our tensors: the parameters and buffers (``state_dict()``'s names) plus
        ``rotate_layer.weight`` (R, fp32) where there is a rotation (see
        :mod:`reft_kernels.interventions.pyreft_keys`); detached. Read directly, not through ``state_dict()``,
        whose FSDP2 hooks would turn them into sharded DTensors (a collective on one rank)."""
        t = {k: v.detach() for k, v in self.named_parameters()}
        derived = {f"{name}.{b}".lstrip(".") for name, m in self.named_modules()
                   for b in m._non_persistent_buffers_set}   # rebuilt from saved state: not saved
        t.update({k: v.detach() for k, v in self.named_buffers() if k not in derived})
        if isinstance(getattr(self, "rotate_layer", None), OrthonormalRotation):
            with torch.no_grad():
                t["rotate_layer.weight"] = self.rotate_layer.weight.detach()
        return t

    def pyreft_state_dict(self) -> dict:
        """Exactly what pyreft 0.1.0's ``state_dict()`` of this class holds (keys, order, dtypes):
        LoReFT ``{weight, bias, rotate_layer (d, r) fp32}``, the others the full module dict with
        ``embed_dim``/``interchange_dim`` and, for a rotation, ``original`` + the d x d ``base``
        (our Householder state verbatim, so pyreft continues the same trajectory)."""
        return to_pyreft(self.canonical_tensors(), type(self)._pyreft_name())

    @classmethod
    def _pyreft_name(cls) -> str:
        return type_name(cls)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept pyreft's keys (both generations) by converting them to ours first."""
        local = [k for k in state_dict if k.startswith(prefix)]
        if is_pyreft_state(k[len(prefix):] for k in local):
            sd = {k[len(prefix):]: state_dict.pop(k) for k in local}
            try:
                ours = from_pyreft(sd, type(self)._pyreft_name(), self.embed_dim)
            except ValueError as e:   # raised at once: torch's aggregate would add missing keys
                raise ValueError(f"loading {prefix[:-1] or type(self).__name__} from a pyreft "
                                 f"state dict: {e}") from None
            if "rotate_layer.reflectors" in ours:   # R is implied by the state
                ours.pop("rotate_layer.weight", None)
            state_dict.update({prefix + k: v for k, v in ours.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, low_rank_dimension={self.low_rank_dimension}, "
                f"dropout={self.dropout_p}, act_fn={self.act_fn}")


_PYREFT_BASE_DEFAULT = [None]   # see set_pyreft_base_default


def set_pyreft_base_default(enabled: Optional[bool]) -> Optional[bool]:
    """What ``pyreft_base=None`` (the default) means for rotations built from now on: True makes
    every Householder rotation without an explicit ``completion`` follow pyreft's whole path
    (``pyreft_base=True``: its d x d base and, through the trainer, its data order), what
    :func:`reft_kernels.as_pyreft` turns on for unmodified pyreft scripts; False gives the light
    ``"compact"`` completion (``as_pyreft(exact=False)``); None, the initial value, leaves it to
    ``completion`` (default ``"pyreft"``, the trainer keeping HF's loader). Returns the old value."""
    if enabled not in (True, False, None):
        raise TypeError(f"enabled={enabled!r} must be True, False or None")
    old, _PYREFT_BASE_DEFAULT[0] = _PYREFT_BASE_DEFAULT[0], enabled
    return old


def _pyreft_base(pyreft_base, orthogonal_map, completion) -> Optional[bool]:
    """The rotation's ``pyreft_base``: the argument, else the global default where it applies
    (Householder map; no explicit completion, or ``"pyreft"`` (a loaded checkpoint's) under True)."""
    if pyreft_base is not None:
        return bool(pyreft_base)
    glob = _PYREFT_BASE_DEFAULT[0]
    if orthogonal_map != "householder" or glob is None:
        return None
    if completion is None or (glob and completion == "pyreft"):
        return glob
    return None


def _check_map(orthogonal_map) -> str:
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError(f"orthogonal_map={orthogonal_map!r} is unknown; use one of {ORTHOGONAL_MAPS} "
                         "('householder' follows pyreft's training trajectory)")
    return orthogonal_map


class _Rotated(ReftIntervention):
    """Base of the classes with an orthonormal ``rotate_layer`` R (r x d); R is built first, so the
    random stream is consumed in pyreft's order (R, then the source)."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, orthogonal_map: str = "householder", pyreft_base: Optional[bool] = None,
                 completion: Optional[str] = None, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn)
        self.rotate_layer = OrthonormalRotation(embed_dim, low_rank_dimension, _check_map(orthogonal_map),
                                                pyreft_base=_pyreft_base(pyreft_base, orthogonal_map, completion),
                                                completion=completion)

    def config_kwargs(self) -> dict:
        return {**super().config_kwargs(), "orthogonal_map": self.rotate_layer.orthogonal_map,
                "completion": self.rotate_layer.completion}


class _RotatedWithSource(_Rotated):
    """R plus ``learned_source = nn.Linear(d, r)`` in ``dtype`` (LoReFT, DiReFT)."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, orthogonal_map: str = "householder", pyreft_base: Optional[bool] = None,
                 completion: Optional[str] = None, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn, orthogonal_map, pyreft_base,
                         completion)
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


class _RotatedConstant(_Rotated):
    """R plus a constant fp32 ``learned_source`` vector b (ConsReFT, LobiReFT)."""

    def __init__(self, embed_dim, low_rank_dimension, dtype=torch.bfloat16, dropout=0.0,
                 act_fn=None, orthogonal_map: str = "householder", pyreft_base: Optional[bool] = None,
                 completion: Optional[str] = None, **ignored):
        super().__init__(embed_dim, low_rank_dimension, dtype, dropout, act_fn, orthogonal_map, pyreft_base,
                         completion)
        self.learned_source = nn.Parameter(torch.rand(low_rank_dimension))

    def op_tensors(self):
        return self.rotate_layer.weight, None, self.learned_source, None


class LoreftIntervention(_RotatedWithSource):
    """LoReFT: ``Phi(h) = dropout(h + R^T (act(W h + b) - R h))``."""


class DireftIntervention(_RotatedWithSource):
    """DiReFT: ``Phi(h) = dropout(h + R^T act(W h + b))`` (no ``- R h`` term)."""


class NoreftIntervention(_ProjectedWithSource):
    """NoReFT: ``Phi(h) = dropout(h + P^T (act(W h + b) - (P h + c)))``, P = proj_layer (not orthogonal)."""

    def op_tensors(self):
        return (self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias,
                self.proj_layer.bias)


class NodireftIntervention(_ProjectedWithSource):
    """NodiReFT: ``Phi(h) = dropout(h + P^T act(W h + b))``; proj_layer.bias is unused, as in pyreft."""

    def op_tensors(self):
        return self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias, None


class ConsreftIntervention(_RotatedConstant):
    """ConsReFT: ``Phi(h) = h + R^T (b - R h)`` (pyreft gives it no dropout; ``dropout`` is ignored)."""


class LobireftIntervention(_RotatedConstant):
    """LobiReFT: ``Phi(h) = dropout(h + R^T b)``."""


class LowRankRotateLayer(nn.Module):
    """pyreft's ``LowRankRotateLayer(n, m, init_orth=True)``: ``x @ W`` with a plain (n, m)
    ``weight`` (orthogonally initialised, *not* kept orthogonal). The ReFT classes here use
    :class:`OrthonormalRotation` instead; this is for code that builds its own layer."""

    def __init__(self, n: int, m: int, init_orth: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m), requires_grad=True)
        if init_orth:
            nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.to(self.weight.dtype), self.weight)
