"""What a checkpoint says about one intervention, and the checks every format shares.

* :class:`InterventionSpec`: everything needed to rebuild one intervention (one entry of
  ``reft_config.json``; for pyreft directories what ``config.json`` or a user config gives).
* pyvene's intervention keys and the class names come from :mod:`reft_kernels.interventions.registry`
  (re-exported: :func:`intervention_key`).
* Canonical tensors: one intervention's weights as a dict with the tensor names of our format:
  ``rotate_layer.weight`` R (r, d) fp32 with orthonormal rows (Lo/Cons/Lobi/DiReFT) and, in our
  format, the rotation's own state for bit-exact resume (``rotate_layer.reflectors``/``.signs``/
  ``.base_householder``, pyreft's d x d ``.base`` when loaded from it, or the Cholesky-QR map's
  ``rotate_layer.basis``; see :mod:`reft_kernels.interventions.rotation`),
  ``proj_layer.weight``/``proj_layer.bias`` (No/NodiReFT), ``learned_source.weight``/``.bias``
  (Lo/No/Di/NodiReFT) or ``learned_source`` (r,) (Cons/LobiReFT). :func:`_check_tensor_set`
  checks that a set is complete and consistent, :func:`check_finite` that it holds no NaN/Inf.

Nothing here touches a model or a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from ..interventions.registry import (REPRESENTATION_FIELDS, intervention_key, lookup, names_where,  # noqa: F401
                                  representation_keys, type_name)
from ..interventions.modules import as_dtype, dtype_name

# live views of the registry (reft_kernels.interventions.registry): they follow later registrations
CLASSES = names_where("name")
ROTATED = names_where("rotated")
PROJECTED = names_where("projected")
VECTOR_SOURCE = names_where("vector_source")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the model or config it is loaded into.

    Raised before anything is modified; the message names the file or intervention key, what is
    wrong and what to do.
    """


@dataclass
class InterventionSpec:
    """Everything needed to rebuild one intervention (one entry of ``reft_config.json``)."""
    key: str
    cls: str
    layer: Optional[int]
    component: str
    unit: str = "pos"
    max_number_of_units: int = 1
    embed_dim: Optional[int] = None
    rank: Optional[int] = None
    dtype: Optional[str] = None
    dropout: float = 0.0
    act_fn: Optional[str] = None
    add_bias: Optional[bool] = None
    completion: Optional[str] = None   # the rotation base's completion; None (older files): from the tensors


# --------------------------------------------------------------------------------------------
# keys and class names

def _keys(reps, key_format):
    """Keys for (layer, component, unit, nunit) tuples in order, with pyvene's collision counter."""
    return representation_keys(reps, key_format)


def _class_name(obj_or_str) -> str:
    """Registered class name of an intervention object, class, or pyvene type string."""
    try:
        return type_name(obj_or_str)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# --------------------------------------------------------------------------------------------
# specs from a user config or one of our modules

def _rep_fields(rep):
    """(layer, component, unit, max_number_of_units, low_rank_dimension, intervention, kwargs) of
    a representation: a dict, a pyvene positional list, or an object with those attributes.
    ``intervention`` is the module, else the ``intervention_type``."""
    if isinstance(rep, (list, tuple)) and not hasattr(rep, "_asdict"):
        vals = dict(zip(REPRESENTATION_FIELDS, rep))
    elif isinstance(rep, dict):
        vals = rep
    else:
        vals = rep._asdict() if hasattr(rep, "_asdict") else vars(rep)
    layer = vals.get("layer")
    iv = vals.get("intervention")
    return (None if layer is None else int(layer), str(vals.get("component") or "block_output"),
            str(vals.get("unit") or "pos"), int(vals.get("max_number_of_units") or 1),
            vals.get("low_rank_dimension"), iv if iv is not None else vals.get("intervention_type"),
            dict(vals.get("intervention_kwargs") or {}))


def _spec_from_module(iv) -> Dict[str, Any]:
    """Constructor facts of one of our intervention modules (class, dims, dtype, ...)."""
    cls = _class_name(iv)
    kw = iv.config_kwargs() if hasattr(iv, "config_kwargs") else {}
    return {"cls": cls, "embed_dim": kw.get("embed_dim"), "dtype": kw.get("dtype"),
            "dropout": float(kw.get("dropout") or 0.0), "act_fn": kw.get("act_fn"),
            "add_bias": kw.get("add_bias") if cls in PROJECTED else None,
            "completion": kw.get("completion") if cls in ROTATED else None}


def _specs_from_config(config, key_format="new"):
    """Specs + intervention objects (or None) from a user ReftConfig-like object."""
    reps = getattr(config, "representations", config)
    reps = reps if isinstance(reps, (list, tuple)) else [reps]
    fields = [_rep_fields(r) for r in reps]
    keys = _keys([f[:4] for f in fields], key_format)
    specs, objs = [], []
    for key, (layer, comp, unit, n, rank, iv, kw) in zip(keys, fields):
        if iv is None:
            raise CheckpointError(f"config representation {key!r} has neither 'intervention' "
                                  f"nor 'intervention_type'")
        obj = None if isinstance(iv, (str, type)) else iv
        if obj is not None:
            spec = _spec_from_module(obj)
        else:
            spec = {"cls": _class_name(iv), "dtype": kw.get("dtype"), "act_fn": kw.get("act_fn"),
                    "dropout": float(kw.get("dropout") or 0.0), "add_bias": kw.get("add_bias"),
                    "completion": kw.get("completion")}
            dtype = spec["dtype"]
            spec["dtype"] = None if dtype is None else dtype_name(as_dtype(dtype))
        specs.append(InterventionSpec(key=key, layer=layer, component=comp, unit=unit,
                                      max_number_of_units=n, rank=rank, **spec))
        objs.append(obj)
    return specs, objs


# --------------------------------------------------------------------------------------------
# canonical tensor sets

def _required(cls: str):
    return lookup(cls).required_tensors()


def _dims(t, cls):
    m = t[lookup(cls).projection_tensor]
    return int(m.shape[1]), int(m.shape[0])


def _check_tensor_set(t: Dict[str, torch.Tensor], cls: str, where: str):
    """Every tensor a ``cls`` needs is present, with mutually consistent shapes."""
    missing = [n for n in _required(cls) if n not in t]
    if missing:
        raise CheckpointError(f"{where}: a {cls} needs tensors {missing}; found {sorted(t)}")
    d, r = _dims(t, cls)
    shapes = {"rotate_layer.weight": (r, d), "rotate_layer.basis": (r, d), "proj_layer.weight": (r, d),
              "rotate_layer.reflectors": (d, r), "rotate_layer.signs": (r,),
              "rotate_layer.base_householder": (d, r), "rotate_layer.base": (d, d),
              "rotate_layer.completion_seed": (),
              "proj_layer.bias": (r,), "learned_source.weight": (r, d),
              "learned_source.bias": (r,), "learned_source": (r,)}
    for name, v in t.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for a {cls}")
        if tuple(v.shape) != shapes[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(v.shape)}, expected "
                                  f"{shapes[name]} (embed_dim={d}, rank={r})")


def check_finite(tensors: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Refuse NaN/Inf in any floating tensor of ``tensors`` (named ``prefix + key`` in the error).

    A checkpoint with non-finite weights gives NaN outputs (or NaN R after orthonormalisation)
    without any error; it is refused here, before anything is loaded.
    """
    for name, v in tensors.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = v[~torch.isfinite(v)]
            kinds = sorted({"NaN" if bool(torch.isnan(x)) else "Inf" for x in bad[:1000]})
            raise CheckpointError(
                f"{where}: tensor {prefix}{name!r} holds {bad.numel()} non-finite values "
                f"({'/'.join(kinds)}) of {v.numel()}; the weights diverged or the file is corrupt. "
                "Load an earlier checkpoint, or retrain with a lower learning rate")
