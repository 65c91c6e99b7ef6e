"""pyreft 0.1.0 state-dict keys <-> our intervention tensors (pure functions, no module, no I/O).

Our tensors ("canonical" in :mod:`reft_kernels.checkpoint`) are an intervention's ordinary
``state_dict()`` plus ``rotate_layer.weight`` (R, (r, d) fp32) for the rotated classes:
``rotate_layer.{reflectors, signs, base_householder[, base]}`` (default Householder map) or
``rotate_layer.basis`` (Cholesky-QR map), ``proj_layer.weight[/bias]``,
``learned_source.weight/bias`` or the (r,) ``learned_source`` of Cons/LobiReFT.

pyreft's keys, two generations:

* LoReFT's slim override: ``{weight (r, d), bias (r,), rotate_layer (d, r) = R^T fp32}``;
* ``nn.Module.state_dict`` (every class; LoReFT's too when saved without the override):
  ``embed_dim``/``interchange_dim`` (0-d int64 buffers), ``rotate_layer.parametrizations.weight.
  original`` (d, r) and ``...weight.0.base`` (d, d), ``proj_layer.*``, ``learned_source[.*]``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional

import torch

from .completions import complete_columns, hartley_factors
from .registry import lookup
from .rotation import PYREFT_BASE, PYREFT_ORIGINAL, apply_householder_base, householder_form, \
    rotation_from_pyreft, rotation_to_pyreft

__all__ = ["from_pyreft", "to_pyreft", "is_pyreft_state", "ORIGINAL", "BASE"]

ORIGINAL = "rotate_layer." + PYREFT_ORIGINAL
BASE = "rotate_layer." + PYREFT_BASE
_PYREFT_ONLY = {"weight", "bias", "rotate_layer", "embed_dim", "interchange_dim", ORIGINAL, BASE}


def is_pyreft_state(names) -> bool:
    """True if a (prefix-free) key set holds keys only pyreft writes."""
    return any(n in _PYREFT_ONLY for n in names)


def from_pyreft(sd: Dict[str, torch.Tensor], cls: str, embed_dim: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Our tensors from a pyreft state dict of class ``cls``; keys it does not know pass through.

    Full rotation state (original + base) becomes our Householder state with the d x d ``base``
    kept, so training continues on pyreft's trajectory, plus R; slim LoReFT gives R only.
    ``embed_dim``/``interchange_dim`` are checked against ``embed_dim`` (or R's width) and
    dropped. Raises ValueError on inconsistent input.
    """
    out = dict(sd)
    dims = {n: out.pop(n) for n in ("embed_dim", "interchange_dim") if n in out}
    if "rotate_layer" in out:  # LoReFT slim: R^T (d, r)
        out["rotate_layer.weight"] = out.pop("rotate_layer").float().mT.contiguous()
    if ORIGINAL in out or BASE in out:
        if ORIGINAL not in out or BASE not in out:
            raise ValueError(f"a pyreft rotation needs both {ORIGINAL!r} and {BASE!r}")
        original, base = out.pop(ORIGINAL).float(), out.pop(BASE).float()
        out["rotate_layer.weight"] = rotation_from_pyreft(original, base)
        out.update(_householder_state(original, base))
    elif "rotate_layer.weight" in out and "rotate_layer" not in sd:  # unparametrised (d, r) layer
        out["rotate_layer.weight"] = out["rotate_layer.weight"].float().mT.contiguous()
    kind = lookup(cls)
    if kind.rotated and not kind.vector_source:
        for slim, ours in (("weight", "learned_source.weight"), ("bias", "learned_source.bias")):
            if slim in out:
                out[ours] = out.pop(slim)
    width = embed_dim
    if width is None:
        m = out.get("rotate_layer.weight", out.get("proj_layer.weight"))
        width = None if m is None else int(m.shape[-1])
    for name, value in dims.items():
        if width is not None and int(value) != width:
            raise ValueError(f"pyreft buffer {name}={int(value)} does not match embed_dim={width}")
    return out


def _householder_state(original, base):
    """Our Householder state (tensor names under ``rotate_layer.``) for pyreft's (original, base)."""
    r = original.shape[1]
    signs = original.diagonal().int().float()
    if not bool((signs != 0).all()):
        raise ValueError(f"pyreft's {ORIGINAL} has a diagonal entry whose int() is 0 (a "
                         f"weight-decayed pyreft rotation): its R is zero, not a rotation")
    return {"rotate_layer.reflectors": original.tril(-1), "rotate_layer.signs": signs,
            "rotate_layer.base_householder": householder_form(base[:, :r]), "rotate_layer.base": base}


def _pyreft_rotation(t: Dict[str, torch.Tensor]):
    """(original, base) for pyreft: our Householder state verbatim when present, else from R."""
    if "rotate_layer.reflectors" in t:
        original = t["rotate_layer.reflectors"].detach().float().tril(-1).clone()
        original.diagonal().copy_(t["rotate_layer.signs"])
        base = t.get("rotate_layer.base")
        if base is None:
            form = t["rotate_layer.base_householder"].float()
            eye = torch.eye(form.shape[0], device=form.device)
            seed = t.get("rotate_layer.completion_seed")
            if seed is not None:   # the hartley completion: base = B_c blockdiag(I, S)
                eye = complete_columns(eye, hartley_factors(form.shape[0] - form.shape[1], int(seed), form.device))
            base = apply_householder_base(form, eye)
        return original, base.detach().float().clone()
    return rotation_to_pyreft(t["rotate_layer.weight"])


def to_pyreft(t: Dict[str, torch.Tensor], cls: str) -> "OrderedDict[str, torch.Tensor]":
    """Exactly the state dict pyreft's ``cls.state_dict()`` holds (keys, order, dtypes)."""
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    kind = lookup(cls)
    d = int(t[kind.projection_tensor].shape[1])
    if kind.pyreft_slim:
        sd["weight"] = t["learned_source.weight"].detach().clone()
        sd["bias"] = t["learned_source.bias"].detach().clone()
        sd["rotate_layer"] = t["rotate_layer.weight"].detach().float().mT.contiguous()
        return sd
    if kind.vector_source:
        sd["learned_source"] = t["learned_source"].detach().clone()
    sd["embed_dim"] = torch.tensor(d)
    sd["interchange_dim"] = torch.tensor(d)
    if kind.projected:
        sd["proj_layer.weight"] = t["proj_layer.weight"].detach().clone()
        if "proj_layer.bias" in t:
            sd["proj_layer.bias"] = t["proj_layer.bias"].detach().clone()
    else:
        sd[ORIGINAL], sd[BASE] = _pyreft_rotation(t)
    if not kind.vector_source:
        sd["learned_source.weight"] = t["learned_source.weight"].detach().clone()
        sd["learned_source.bias"] = t["learned_source.bias"].detach().clone()
    return sd
