"""Canonical tensors (see :mod:`.spec`) to and from our intervention modules and pyreft state dicts.

pyreft's rotated classes hold R through torch's orthogonal parametrization: the materialized
``rotate_layer.weight`` is R^T = base @ householder_product(original), with ``base`` (d, d) fixed
at initialisation and ``original`` (d, r) trained. LoReFT's slim save keeps R^T (d, r) directly.
:func:`rotation_from_pyreft` evaluates that map with torch's own code; :func:`rotation_to_pyreft`
finds (original, base) that reproduce a given R exactly.

Our modules hold R as ``rotate_layer.weight`` (computed) and, where the parametrisation has one, the
trainable ``rotate_layer.basis``; :func:`_tensors_from_module` / :func:`_load_into_module` read and
write them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import nn

from .spec import (PROJECTED, ROTATED, VECTOR_SOURCE, CheckpointError, _check_tensor_set,
                   _dims)

_ORIG = "rotate_layer.parametrizations.weight.original"
_BASE = "rotate_layer.parametrizations.weight.0.base"


# --------------------------------------------------------------------------------------------
# rotations: pyreft's orthogonal parametrization <-> our R (r, d)

def _orthogonal_holder(weight: torch.Tensor) -> nn.Module:
    """A module whose ``weight`` (d, r) is wrapped exactly as pyreft wraps its rotate_layer."""
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach().clone())
    with torch.random.fork_rng(devices=[]):  # right_inverse draws randn: keep the caller's RNG
        torch.manual_seed(0)
        torch.nn.utils.parametrizations.orthogonal(holder)
    return holder


def rotation_from_pyreft(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R (r, d) fp32 from pyreft's ``original`` (d, r) and ``base`` (d, d), via torch's own map."""
    orth = _orthogonal_holder(torch.eye(2, 1)).parametrizations.weight[0]
    orth.base = base.detach().float()
    with torch.no_grad():
        return orth(original.detach().float()).T.contiguous()


def rotation_to_pyreft(R: torch.Tensor):
    """(original (d, r), base (d, d)) fp32 such that pyreft's materialized weight is exactly R^T."""
    Rt = R.detach().float().T.contiguous()
    holder = _orthogonal_holder(Rt)  # base = orthonormal completion of R^T, original = -I
    p = holder.parametrizations.weight
    with torch.no_grad():
        p[0].base[:, : Rt.shape[1]] = Rt  # exact, not just up to QR round-off
        if not torch.equal(holder.weight, Rt):
            raise RuntimeError("internal error: pyreft rotation does not reproduce R exactly")
    return p.original.detach().clone(), p[0].base.detach().clone()


# --------------------------------------------------------------------------------------------
# pyreft state dicts <-> canonical tensors

def canonical_from_pyreft(sd: Dict[str, torch.Tensor], cls: str, where: str) -> Dict[str, torch.Tensor]:
    """Canonical tensors from a pyreft ``intkey_*.bin`` state dict (slim LoReFT or full)."""
    out: Dict[str, torch.Tensor] = {}
    if "rotate_layer" in sd:  # LoReFT's slim format: rotate_layer is R (d, r)
        out["rotate_layer.weight"] = sd["rotate_layer"].float().T.contiguous()
    elif _ORIG in sd and _BASE in sd:
        out["rotate_layer.weight"] = rotation_from_pyreft(sd[_ORIG], sd[_BASE])
    elif "rotate_layer.weight" in sd:  # an unparametrized (d, r) rotate_layer
        out["rotate_layer.weight"] = sd["rotate_layer.weight"].float().T.contiguous()
    for name in ("proj_layer.weight", "proj_layer.bias", "learned_source.weight",
                 "learned_source.bias"):
        if name in sd:
            out[name] = sd[name]
    if "learned_source" in sd and torch.is_tensor(sd["learned_source"]):
        out["learned_source"] = sd["learned_source"]
    if cls == "LoreftIntervention" and "weight" in sd:
        out["learned_source.weight"] = sd["weight"]
        if "bias" in sd:
            out["learned_source.bias"] = sd["bias"]
    _check_tensor_set(out, cls, where)
    if "embed_dim" in sd and int(sd["embed_dim"]) != _dims(out, cls)[0]:
        raise CheckpointError(f"{where}: buffer embed_dim={int(sd['embed_dim'])} does not match "
                              f"the tensors' dimension {_dims(out, cls)[0]}")
    return out


def canonical_to_pyreft(t: Dict[str, torch.Tensor], cls: str) -> "OrderedDict[str, torch.Tensor]":
    """Exactly the state dict pyreft's ``cls.state_dict()`` would hold (keys, order, dtypes)."""
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    d, _ = _dims(t, cls)
    if cls == "LoreftIntervention":
        sd["weight"] = t["learned_source.weight"].detach().clone()
        sd["bias"] = t["learned_source.bias"].detach().clone()
        sd["rotate_layer"] = t["rotate_layer.weight"].detach().float().T.contiguous()
        return sd
    if cls in VECTOR_SOURCE:
        sd["learned_source"] = t["learned_source"].detach().clone()
    sd["embed_dim"] = torch.tensor(d)
    sd["interchange_dim"] = torch.tensor(d)
    if cls in PROJECTED:
        sd["proj_layer.weight"] = t["proj_layer.weight"].detach().clone()
        if "proj_layer.bias" in t:
            sd["proj_layer.bias"] = t["proj_layer.bias"].detach().clone()
    else:
        sd[_ORIG], sd[_BASE] = rotation_to_pyreft(t["rotate_layer.weight"])
    if cls not in VECTOR_SOURCE:
        sd["learned_source.weight"] = t["learned_source.weight"].detach().clone()
        sd["learned_source.bias"] = t["learned_source.bias"].detach().clone()
    return sd


# --------------------------------------------------------------------------------------------
# our intervention modules <-> canonical tensors

def _tensors_from_module(iv, cls) -> Dict[str, torch.Tensor]:
    t: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if cls in ROTATED:
            t["rotate_layer.weight"] = iv.rotate_layer.weight.detach().float()
            if isinstance(getattr(iv.rotate_layer, "basis", None), torch.Tensor):
                t["rotate_layer.basis"] = iv.rotate_layer.basis.detach()
        else:
            t["proj_layer.weight"] = iv.proj_layer.weight.detach()
            if iv.proj_layer.bias is not None:
                t["proj_layer.bias"] = iv.proj_layer.bias.detach()
        if cls in VECTOR_SOURCE:
            t["learned_source"] = iv.learned_source.detach()
        else:
            t["learned_source.weight"] = iv.learned_source.weight.detach()
            t["learned_source.bias"] = iv.learned_source.bias.detach()
    return t


@torch.no_grad()
def _load_into_module(iv, t, cls):
    """Copy canonical tensors into our module (dtype-casting copies; R set exactly if possible)."""
    if cls in ROTATED:
        basis = getattr(iv.rotate_layer, "basis", None)
        if "rotate_layer.basis" in t and isinstance(basis, torch.Tensor):
            basis.copy_(t["rotate_layer.basis"])
        else:
            iv.rotate_layer.set_weight(t["rotate_layer.weight"])
    else:
        iv.proj_layer.weight.copy_(t["proj_layer.weight"])
        if iv.proj_layer.bias is not None:
            iv.proj_layer.bias.copy_(t["proj_layer.bias"])
    if cls in VECTOR_SOURCE:
        iv.learned_source.copy_(t["learned_source"])
    else:
        iv.learned_source.weight.copy_(t["learned_source.weight"])
        iv.learned_source.bias.copy_(t["learned_source.bias"])
