"""Canonical tensors (see :mod:`.spec`) to and from our intervention modules and pyreft state dicts.

pyreft's rotated classes hold R through torch's orthogonal parametrization: the materialized
``rotate_layer.weight`` is R^T = base @ householder_product(original), with ``base`` (d, d) fixed
at initialisation and ``original`` (d, r) trained; LoReFT's slim save keeps R^T (d, r) directly.
The key conversion lives in :mod:`reft_kernels.interventions.pyreft_keys` and the rotation maps in
:mod:`reft_kernels.interventions.rotation` (``rotation_from_pyreft`` / ``rotation_to_pyreft`` are re-exported here).

Our modules hold R as ``rotate_layer.weight`` (computed) plus the rotation's own state for
bit-exact resume (``rotate_layer.reflectors``, ``.signs``, ``.base_householder`` and, loaded from
pyreft's full state, the d x d ``.base``; or ``rotate_layer.basis`` for the Cholesky-QR map and
checkpoints older than the Householder map); :func:`_tensors_from_module` /
:func:`_load_into_module` read and write them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch

from ..interventions.pyreft_keys import from_pyreft, to_pyreft
from ..interventions.rotation import rotation_from_pyreft, rotation_to_pyreft  # noqa: F401 - public helpers
from .spec import ROTATED, VECTOR_SOURCE, CheckpointError, _check_tensor_set


# --------------------------------------------------------------------------------------------
# pyreft state dicts <-> canonical tensors

def canonical_from_pyreft(sd: Dict[str, torch.Tensor], cls: str, where: str) -> Dict[str, torch.Tensor]:
    """Canonical tensors from a pyreft ``intkey_*.bin`` state dict (slim LoReFT or full).

    A full rotation state (original + d x d base) is kept as our Householder state, so training
    resumed from it follows pyreft's trajectory.
    """
    try:
        out = from_pyreft(sd, cls)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    _check_tensor_set(out, cls, where)
    return out


def canonical_to_pyreft(t: Dict[str, torch.Tensor], cls: str) -> "OrderedDict[str, torch.Tensor]":
    """Exactly the state dict pyreft's ``cls.state_dict()`` would hold (keys, order, dtypes)."""
    return to_pyreft(t, cls)


# --------------------------------------------------------------------------------------------
# our intervention modules <-> canonical tensors

def _tensors_from_module(iv, cls) -> Dict[str, torch.Tensor]:
    """Canonical tensors of our module: R plus the rotation's own state (either map)."""
    if hasattr(iv, "canonical_tensors"):
        return iv.canonical_tensors()
    t: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if cls in ROTATED:
            t["rotate_layer.weight"] = iv.rotate_layer.weight.detach().float()
            t.update({f"rotate_layer.{k}": v.detach() for k, v in iv.rotate_layer.state_dict().items()})
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
        state = {k[len("rotate_layer."):]: v for k, v in t.items()
                 if k.startswith("rotate_layer.") and k != "rotate_layer.weight"}
        if state:  # the rotation converts between parametrisations (e.g. an old basis)
            try:
                iv.rotate_layer.load_state_dict(state)
            except (RuntimeError, ValueError) as e:  # e.g. a rank-deficient basis
                raise CheckpointError(f"{cls}: {e}") from e
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
