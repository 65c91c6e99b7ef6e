"""Save and load ReFT checkpoints: our safetensors format, and pyreft/pyvene directories.

Formats
-------
* **reft_kernels** (written by :func:`save_reft_model`): ``reft_config.json`` (everything needed
  to rebuild: per intervention class, layer, component, embed_dim, rank, dtype, dropout, act_fn,
  add_bias, key) + ``adapter.safetensors`` (+ ``base_model.safetensors`` when base-model
  parameters were trainable). Reading it never unpickles anything.
* **pyreft / pyvene** (read by :func:`load_reft_model`, written by :func:`export_pyreft`):
  ``config.json`` (a pyvene ``IntervenableConfig``) + one ``intkey_<key>.bin`` (``torch.save``) per
  intervention + optional ``pytorch_model.bin``. Trainer checkpoints (``.../intervenable_model``)
  have no ``config.json``: pass ``config=``. Both key generations are read
  (pyvene <= 0.1.6 ``layer.15.comp.block_output.unit.pos.nunit.1#0``, >= 0.1.7
  ``layer_15_comp_block_output_unit_pos_nunit_1#0``); ``.bin`` files are read with
  ``torch.load(weights_only=True)``.

Internally one intervention's weights are a dict with the tensor names of our format:
``rotate_layer.weight`` R (r, d) fp32 with orthonormal rows (Lo/Cons/Lobi/DiReFT) and, in our
format, the rotation's state for bit-exact resume (``rotate_layer.reflectors``, ``.signs``,
``.base_householder`` and, loaded from pyreft's full state, the d x d ``.base``; or
``rotate_layer.basis`` for the Cholesky-QR map and checkpoints older than the Householder map),
``proj_layer.weight``/``proj_layer.bias`` (No/NodiReFT), ``learned_source.weight``/``.bias``
(Lo/No/Di/NodiReFT) or ``learned_source`` (r,) (Cons/LobiReFT); see :mod:`reft_kernels.pyreft_keys`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from .interventions import as_dtype, dtype_name
from .pyreft_keys import from_pyreft, to_pyreft
from .rotation import rotation_from_pyreft, rotation_to_pyreft  # noqa: F401 - public helpers

__all__ = ["save_reft_model", "load_reft_model", "load_weights", "export_pyreft",
           "intervention_key", "CONFIG_NAME", "WEIGHTS_NAME", "BASE_WEIGHTS_NAME"]

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "adapter.safetensors"
BASE_WEIGHTS_NAME = "base_model.safetensors"
PYREFT_CONFIG = "config.json"
PYREFT_BASE = "pytorch_model.bin"
FORMAT = "reft_kernels"
FORMAT_VERSION = 1

CLASSES = ("LoreftIntervention", "NoreftIntervention", "ConsreftIntervention",
           "LobireftIntervention", "DireftIntervention", "NodireftIntervention")
ROTATED = {"LoreftIntervention", "ConsreftIntervention", "LobireftIntervention", "DireftIntervention"}
PROJECTED = {"NoreftIntervention", "NodireftIntervention"}
VECTOR_SOURCE = {"ConsreftIntervention", "LobireftIntervention"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or config it is loaded into (nothing was modified)."""


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


# --------------------------------------------------------------------------------------------
# keys and small helpers

def intervention_key(layer, component, unit="pos", max_number_of_units=1, index=0,
                     key_format="new") -> str:
    """pyvene's intervention key; ``key_format`` "new" (pyvene >= 0.1.7) or "old" (<= 0.1.6)."""
    if key_format == "new":
        u = unit.replace(".", "_")
        if "." in component:
            return f"comp_{component.replace('.', '_')}_unit_{u}_nunit_{max_number_of_units}#{index}"
        return f"layer_{layer}_comp_{component}_unit_{u}_nunit_{max_number_of_units}#{index}"
    if key_format == "old":
        if "." in component:
            return f"comp.{component}.unit.{unit}.nunit.{max_number_of_units}#{index}"
        return f"layer.{layer}.comp.{component}.unit.{unit}.nunit.{max_number_of_units}#{index}"
    raise ValueError(f"key_format={key_format!r} is unknown; use 'new' or 'old'")


def _keys(reps, key_format):
    """Keys for (layer, component, unit, nunit) tuples in order, with pyvene's collision counter."""
    seen: Dict[str, int] = {}
    out = []
    for layer, comp, unit, n in reps:
        base = intervention_key(layer, comp, unit, n, 0, key_format)[:-2]
        seen[base] = seen.get(base, -1) + 1
        out.append(f"{base}#{seen[base]}")
    return out


def _class_name(obj_or_str) -> str:
    """Pyreft class name of an intervention object, class, or pyvene type string."""
    if isinstance(obj_or_str, str):
        name = re.sub(r"^<class '(.*)'>$", r"\1", obj_or_str).rsplit(".", 1)[-1]
    else:
        cls = obj_or_str if isinstance(obj_or_str, type) else type(obj_or_str)
        name = next((c.__name__ for c in cls.__mro__ if c.__name__ in CLASSES), cls.__name__)
    if name not in CLASSES:
        raise CheckpointError(f"intervention type {obj_or_str!r} is not supported; the supported "
                              f"pyreft classes are {', '.join(CLASSES)}")
    return name


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# rotations: rotation_from_pyreft / rotation_to_pyreft live in reft_kernels.rotation


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


def _required(cls: str):
    req = ["rotate_layer.weight"] if cls in ROTATED else ["proj_layer.weight"]
    req += ["learned_source"] if cls in VECTOR_SOURCE else ["learned_source.weight",
                                                            "learned_source.bias"]
    return req


def _dims(t, cls):
    m = t["rotate_layer.weight"] if cls in ROTATED else t["proj_layer.weight"]
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
              "proj_layer.bias": (r,), "learned_source.weight": (r, d),
              "learned_source.bias": (r,), "learned_source": (r,)}
    for name, v in t.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for a {cls}")
        if tuple(v.shape) != shapes[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(v.shape)}, expected "
                                  f"{shapes[name]} (embed_dim={d}, rank={r})")


# --------------------------------------------------------------------------------------------
# validation against the model

def _cfg(model, *names):
    cfg = getattr(model, "config", None)
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)


def _expected_dim(model, spec: InterventionSpec):
    """(embed_dim the model gives this site, or None if unknown; error text or None)."""
    from .patcher import hidden_size, resolve_site

    try:
        site = resolve_site(model, spec.layer, spec.component)
    except ValueError as e:
        return None, str(e)
    if "." not in spec.component:  # every supported abstract component is residual-width
        return hidden_size(model), None
    mod = site.module  # string component: infer the width where the module shows it
    if isinstance(mod, nn.Linear):
        return (mod.out_features if site.kind == "output" else mod.in_features), None
    norm = next((c for c in mod.children() if isinstance(c, (nn.LayerNorm, nn.RMSNorm))), None)
    if site.kind == "output" and norm is not None:  # e.g. RobertaOutput
        return int(norm.normalized_shape[-1]), None
    size = getattr(mod, "hidden_size", None)  # e.g. HF decoder layers
    return (size if isinstance(size, int) else None), None


def _validate(model, specs, tensors, where):
    """Raise CheckpointError for the first spec that does not fit the model; touches nothing."""
    for spec, t in zip(specs, tensors):
        d, r = _dims(t, spec.cls)
        at = f"{where}: intervention {spec.key!r}"
        if spec.rank is not None and int(spec.rank) != r:
            raise CheckpointError(f"{at}: rank (low_rank_dimension) expected {spec.rank} from the "
                                  f"config, found {r} in the saved tensors")
        if spec.embed_dim is not None and int(spec.embed_dim) != d:
            raise CheckpointError(f"{at}: embed_dim expected {spec.embed_dim} from the config, "
                                  f"found {d} in the saved tensors")
        expected, err = _expected_dim(model, spec)
        if err:
            raise CheckpointError(f"{at}: {err}")
        if expected is not None and int(expected) != d:
            raise CheckpointError(f"{at}: embed_dim expected {expected} (the model's size for "
                                  f"component {spec.component!r}), found {d} in the checkpoint")
        if "rotate_layer.weight" in t and "rotate_layer.basis" not in t:
            R = t["rotate_layer.weight"].double()
            err = (R @ R.T - torch.eye(r, dtype=R.dtype)).abs().max().item()
            if err > 1e-4:
                raise CheckpointError(f"{at}: the saved rotation is not orthonormal "
                                      f"(max |R R^T - I| = {err:.1e}); the file is corrupt")


def _validate_base(model, sd, where):
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, v in sd.items():
        if name not in params:
            raise CheckpointError(f"{where}: base-model parameter {name!r} does not exist in "
                                  f"{type(model).__name__}")
        if tuple(params[name].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: base-model parameter {name!r} expected shape "
                                  f"{tuple(params[name].shape)}, found {tuple(v.shape)}")


# --------------------------------------------------------------------------------------------
# reading a directory -> (specs, canonical tensors, base-model state dict)

def _rep_fields(rep):
    """(layer, component, unit, max_number_of_units, low_rank_dimension, intervention, kwargs) of
    a representation: a dict, a pyvene positional list, or an object with those attributes.
    ``intervention`` is the module, else the ``intervention_type``."""
    names = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
             "intervention_type", "intervention")
    if isinstance(rep, (list, tuple)) and not hasattr(rep, "_asdict"):
        vals = dict(zip(names, rep))
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


def _load_bin(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file, whatever torch raised
        raise CheckpointError(f"cannot read {path} as a pyreft weights file "
                              f"(torch.load(weights_only=True) failed: {e})") from e


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
                    "dropout": float(kw.get("dropout") or 0.0), "add_bias": kw.get("add_bias")}
            dtype = spec["dtype"]
            spec["dtype"] = None if dtype is None else dtype_name(as_dtype(dtype))
        specs.append(InterventionSpec(key=key, layer=layer, component=comp, unit=unit,
                                      max_number_of_units=n, rank=rank, **spec))
        objs.append(obj)
    return specs, objs


def _read_pyreft(path, config):
    """Specs + canonical tensors of a pyreft directory (with config.json, or given ``config``)."""
    cfg_file = os.path.join(path, PYREFT_CONFIG)
    if config is not None:
        specs, objs = _specs_from_config(config)
        sorted_keys = [None] * len(specs)
    elif os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
        reps = cfg.get("representations") or []
        if reps and not isinstance(reps[0], (list, dict)):  # a single representation
            reps = [reps]
        types = cfg.get("intervention_types")
        types = types if isinstance(types, list) else [types] * len(reps)
        fields = [_rep_fields(r) for r in reps]
        keys = _keys([f[:4] for f in fields], "new")
        specs = [InterventionSpec(key=k, cls=_class_name(t), layer=f[0], component=f[1],
                                  unit=f[2], max_number_of_units=f[3], rank=f[4])
                 for k, t, f in zip(keys, types, fields)]
        objs = [None] * len(specs)
        sorted_keys = list(cfg.get("sorted_keys") or [None] * len(specs))
    else:
        raise CheckpointError(f"{path} has neither {CONFIG_NAME} nor {PYREFT_CONFIG}: for a pyreft "
                              f"trainer checkpoint (intervenable_model/) pass config=ReftConfig(...)")
    old = _keys([(s.layer, s.component, s.unit, s.max_number_of_units) for s in specs], "old")
    tensors = []
    for spec, sk, old_key in zip(specs, sorted_keys, old):
        tried = [k for k in (sk, spec.key, old_key) if k]
        found = next((k for k in tried if os.path.isfile(os.path.join(path, f"intkey_{k}.bin"))), None)
        if found is None:
            have = sorted(f for f in os.listdir(path) if f.startswith("intkey_"))
            raise CheckpointError(f"{path}: no weights file for intervention {spec.key!r}; looked "
                                  f"for {['intkey_%s.bin' % k for k in tried]}, found {have}")
        where = f"{path}/intkey_{found}.bin"
        t = canonical_from_pyreft(_load_bin(os.path.join(path, f"intkey_{found}.bin")), spec.cls, where)
        if spec.cls in PROJECTED and spec.add_bias is None:  # pyreft does not save add_bias
            spec.add_bias = "proj_layer.bias" in t
        tensors.append(t)
    base_file = os.path.join(path, PYREFT_BASE)
    base = _load_bin(base_file) if os.path.isfile(base_file) else {}
    return specs, objs, tensors, base


def _read_ours(path, config):
    """Specs + canonical tensors of our format. Uses only json and safetensors (no pickle)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r} is not readable by this version "
                              f"(reads {FORMAT!r} <= {FORMAT_VERSION}); upgrade reft_kernels")
    flat = load_file(os.path.join(path, WEIGHTS_NAME), device="cpu")
    if config is not None:
        specs, objs = _specs_from_config(config)
    else:
        known = InterventionSpec.__dataclass_fields__
        specs = [InterventionSpec(**{k: v for k, v in e.items() if k in known})
                 for e in meta["interventions"]]
        objs = [None] * len(specs)
    tensors = []
    for spec in specs:
        t = {k[len(spec.key) + 1:]: v for k, v in flat.items() if k.startswith(spec.key + ".")}
        if not t:
            raise CheckpointError(f"{path}/{WEIGHTS_NAME}: no tensors for intervention "
                                  f"{spec.key!r}; the file holds keys of "
                                  f"{sorted({k.rsplit('#', 1)[0] for k in flat})}")
        _check_tensor_set(t, spec.cls, f"{path}/{WEIGHTS_NAME}[{spec.key}]")
        tensors.append(t)
    base_file = os.path.join(path, BASE_WEIGHTS_NAME)
    base = load_file(base_file, device="cpu") if os.path.isfile(base_file) else {}
    return specs, objs, tensors, base, meta


def _resolve_dir(path, local_directory=None, from_huggingface_hub=False) -> str:
    """A local directory, or (like pyvene) a Hugging Face Hub repo id downloaded first."""
    path = os.fspath(path)
    if os.path.isdir(path) and not from_huggingface_hub:
        return path
    if not from_huggingface_hub and (os.path.exists(path) or path.count("/") != 1):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id=path, local_dir=local_directory)


def read_checkpoint(path, config=None):
    """Parse a checkpoint directory without touching any model.

    Returns ``(format, specs, objects, tensors, base_state_dict, meta)``; ``objects`` are the
    intervention objects of ``config`` (or None each) and ``tensors`` the canonical weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        specs, objs, tensors, base, meta = _read_ours(path, config)
        return FORMAT, specs, objs, tensors, base, meta
    specs, objs, tensors, base = _read_pyreft(path, config)
    return "pyreft", specs, objs, tensors, base, {}


# --------------------------------------------------------------------------------------------
# our intervention modules <-> specs and canonical tensors

def _spec_from_module(iv) -> Dict[str, Any]:
    """Constructor facts of one of our intervention modules (class, dims, dtype, ...)."""
    cls = _class_name(iv)
    kw = iv.config_kwargs() if hasattr(iv, "config_kwargs") else {}
    return {"cls": cls, "embed_dim": kw.get("embed_dim"), "dtype": kw.get("dtype"),
            "dropout": float(kw.get("dropout") or 0.0), "act_fn": kw.get("act_fn"),
            "add_bias": kw.get("add_bias") if cls in PROJECTED else None}


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


def _check_fits_module(iv, t, cls, where):
    """Raise if canonical tensors ``t`` cannot be loaded into module ``iv`` (touches nothing)."""
    if _class_name(iv) != cls:
        raise CheckpointError(f"{where}: checkpoint holds a {cls}, the config a {_class_name(iv)}")
    have = _tensors_from_module(iv, cls)
    for name, v in t.items():
        if name.startswith("rotate_layer.") and name not in have:
            continue  # another parametrisation's state: the rotation converts it on load
        if name not in have:
            raise CheckpointError(f"{where}: the checkpoint has {name!r} but the {cls} has no such "
                                  f"tensor (add_bias={getattr(iv, 'add_bias', None)})")
        if tuple(have[name].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: {name} expected shape {tuple(have[name].shape)} "
                                  f"(the config's module), found {tuple(v.shape)} in the checkpoint")
    if cls in PROJECTED and "proj_layer.bias" in have and "proj_layer.bias" not in t:
        raise CheckpointError(f"{where}: the {cls} has add_bias=True but the checkpoint has no "
                              f"proj_layer.bias")


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


def _build_module(spec: InterventionSpec, t, dtype):
    from .interventions import intervention_class

    d, r = _dims(t, spec.cls)
    kw = {"embed_dim": d, "low_rank_dimension": r, "dtype": dtype, "dropout": spec.dropout,
          "act_fn": spec.act_fn}
    if "rotate_layer.basis" in t:  # saved with the Cholesky-QR map: resume with it, exactly
        kw["orthogonal_map"] = "cholesky_qr"
    if spec.cls in PROJECTED:
        kw["add_bias"] = "proj_layer.bias" in t if spec.add_bias is None else bool(spec.add_bias)
    with torch.random.fork_rng(devices=[]):  # construction draws init values we overwrite
        return intervention_class(spec.cls)(**kw)


# --------------------------------------------------------------------------------------------
# the ReftModel side

def _entries(reft_model):
    """[(key, layer, component, unit, nunit, module)] of a ReftModel, in config order."""
    ivs = reft_model.interventions
    reps = getattr(getattr(reft_model, "config", None), "representations", None)
    reps = reps if isinstance(reps, (list, tuple)) else [reps] if reps is not None else []
    if len(reps) != len(ivs):
        raise TypeError(f"cannot match {len(ivs)} interventions to {len(reps)} config "
                        f"representations of {type(reft_model).__name__}")
    out = []
    for (key, iv), rep in zip(ivs.items(), reps):
        layer, comp, unit, n = _rep_fields(rep)[:4]
        out.append((key, layer, comp, unit, n, iv))
    return out


def _trainable_base(reft_model):
    """{name: tensor} of trainable base-model parameters (not the interventions')."""
    own = {id(p) for iv in reft_model.interventions.values() for p in iv.parameters()}
    return {n: p for n, p in reft_model.model.named_parameters()
            if p.requires_grad and id(p) not in own}


def _config_extras(reft_model):
    """Position settings a config may carry (``positions="f1+l1"``, ``share_weights``)."""
    cfg = getattr(reft_model, "config", None)
    return {n: getattr(cfg, n) for n in ("positions", "share_weights")
            if isinstance(getattr(cfg, n, None), (str, bool, int))}


def _make_reft_model(model, specs, modules, extras, **kwargs):
    from .config import ReftConfig
    from .reft_model import get_reft_model

    reps = [{"layer": s.layer, "component": s.component, "unit": s.unit,
             "max_number_of_units": s.max_number_of_units,
             "low_rank_dimension": m.config_kwargs()["low_rank_dimension"], "intervention": m}
            for s, m in zip(specs, modules)]
    try:
        config = ReftConfig(representations=reps, **extras)
    except TypeError:  # a config without the extra fields
        config = ReftConfig(representations=reps)
    return get_reft_model(model, config, **kwargs)


# --------------------------------------------------------------------------------------------
# atomic directory writes

def _replaceable(path) -> bool:
    """An existing directory may be replaced only if it is empty or a ReFT checkpoint."""
    names = os.listdir(path)
    known = {CONFIG_NAME, WEIGHTS_NAME, BASE_WEIGHTS_NAME, PYREFT_CONFIG, PYREFT_BASE}
    is_ckpt = CONFIG_NAME in names or any(n.startswith("intkey_") for n in names)
    return not names or (is_ckpt and all(n in known or (n.startswith("intkey_") and
                                                         n.endswith(".bin")) for n in names))


def _atomic_write_dir(path, write):
    """Run ``write(tmp_dir)`` in a temp dir beside ``path``, then rename it to ``path``.

    An existing checkpoint at ``path`` is replaced only after the new one is complete; any
    failure leaves it intact (and removes the temp dir).
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.exists(path) and (not os.path.isdir(path) or not _replaceable(path)):
        raise FileExistsError(f"{path} exists and is not a ReFT checkpoint directory; refusing to "
                              f"replace it: choose a new or empty directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _library_version():
    try:
        from importlib.metadata import version
        return version("reft_kernels")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "0.1.0"


# --------------------------------------------------------------------------------------------
# public API

def save_reft_model(reft_model, save_directory, include_model: bool = True) -> str:
    """Save ``reft_model`` in our format; returns the directory's absolute path.

    Writes ``reft_config.json`` + ``adapter.safetensors`` (+ ``base_model.safetensors`` holding
    the trainable base-model parameters when ``include_model`` and there are any). The write is
    atomic: a temp dir beside the target, renamed into place when complete.
    """
    from safetensors.torch import save_file

    specs, flat = [], {}
    for key, layer, comp, unit, n, iv in _entries(reft_model):
        spec = InterventionSpec(key=key, layer=layer, component=comp, unit=unit,
                                max_number_of_units=n, **_spec_from_module(iv))
        t = _tensors_from_module(iv, spec.cls)
        spec.embed_dim, spec.rank = _dims(t, spec.cls)
        specs.append(spec)
        flat.update({f"{key}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in t.items()})
    base = _trainable_base(reft_model) if include_model else {}
    model = reft_model.model
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "model": {"class": type(model).__name__, "hidden_size": _cfg(model, "hidden_size", "n_embd"),
                  "num_hidden_layers": _cfg(model, "num_hidden_layers", "n_layer")},
        "config": _config_extras(reft_model),
        "base_model_parameters": sorted(base),
        "interventions": [asdict(s) for s in specs],
    }

    def write(tmp):
        save_file(flat, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": FORMAT})
        if base:
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in base.items()},
                      os.path.join(tmp, BASE_WEIGHTS_NAME), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    return _atomic_write_dir(save_directory, write)


def _prepare(path, model, config, dtype):
    """Read + validate everything and build (unattached) modules; touches nothing of ``model``."""
    fmt, specs, objs, tensors, base, meta = read_checkpoint(path, config)
    where = os.fspath(path)
    if meta.get("model", {}).get("class") not in (None, type(model).__name__):
        warnings.warn(f"{where} was saved from a {meta['model']['class']}, loading it into a "
                      f"{type(model).__name__}", stacklevel=3)
    _validate(model, specs, tensors, where)
    if base:
        _validate_base(model, base, where)
    for spec, obj, t in zip(specs, objs, tensors):
        if obj is not None:
            _check_fits_module(obj, t, spec.cls, f"{where}: intervention {spec.key!r}")
    modules = []
    for spec, obj, t in zip(specs, objs, tensors):
        if obj is None:
            dt = dtype if dtype is not None else spec.dtype or _model_dtype(model)
            obj = _build_module(spec, t, as_dtype(dt))
        modules.append(obj)
    return specs, modules, tensors, base, meta


def load_reft_model(load_directory, model, config=None, *, dtype=None, include_model: bool = True,
                    local_directory=None, from_huggingface_hub: bool = False,
                    **get_reft_model_kwargs):
    """Load a ReFT checkpoint (our format or pyreft's) onto ``model``; returns a ReftModel.

    ``config``: a ReftConfig whose interventions define class, dtype, dropout and act_fn (needed
    for pyreft trainer checkpoints, which have no config.json; pyreft's config.json records
    neither dtype, dropout nor act_fn). ``dtype``: of the learned_source/proj_layer weights of
    interventions built from the checkpoint; default: the saved dtype for our format, the
    model's dtype for pyreft's. ``include_model``: also load saved base-model parameters
    (``base_model.safetensors`` / ``pytorch_model.bin``), which are then left trainable.
    ``local_directory``/``from_huggingface_hub``: as pyvene's, for a Hub repo id (downloaded with
    ``huggingface_hub.snapshot_download``). Other keywords go to :func:`get_reft_model`.

    Everything is read and checked before ``model`` is touched: on any error (CheckpointError
    names the intervention key, the expected and the found value) the model is unchanged.
    """
    path = _resolve_dir(load_directory, local_directory, from_huggingface_hub)
    specs, modules, tensors, base, meta = _prepare(path, model, config, dtype)
    for spec, iv, t in zip(specs, modules, tensors):
        _load_into_module(iv, t, spec.cls)
    device = _model_device(model)
    modules = [m.to(device) for m in modules]
    extras = meta.get("config", {}) if config is None else {}
    reft_model = _make_reft_model(model, specs, modules, extras, **get_reft_model_kwargs)
    if include_model and base:
        _load_base(reft_model.model, base)
    return reft_model


def _load_base(model, base):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, v in base.items():
            if name in params:
                params[name].copy_(v)
                params[name].requires_grad_(True)
            else:
                model.get_buffer(name).copy_(v)


def load_weights(reft_model, load_directory, include_model: bool = True) -> None:
    """Load checkpoint weights into an existing ReftModel (pyvene's ``load_intervention``).

    Interventions are matched by key (either key generation). Validated before anything changes.
    """
    entries = _entries(reft_model)
    reps = [{"layer": e[1], "component": e[2], "unit": e[3], "max_number_of_units": e[4],
             "intervention": e[5]} for e in entries]

    class _Cfg:  # the model's own layout as a config
        representations = reps

    specs, _, tensors, base, _ = _prepare(load_directory, reft_model.model, _Cfg, None)
    for spec, (_, *_, iv), t in zip(specs, entries, tensors):
        _load_into_module(iv, t, spec.cls)
    if include_model and base:
        _load_base(reft_model.model, base)


def export_pyreft(reft_model, save_directory, key_format: str = "new",
                  include_model: bool = True) -> str:
    """Write ``reft_model`` in pyreft 0.1.0 / pyvene's format (loadable by ``pyreft.ReftModel.load``).

    ``config.json`` as pyvene's ``IntervenableConfig.save_pretrained`` writes it, and per
    intervention ``intkey_<key>.bin`` (``torch.save``) with exactly pyreft's keys and dtypes:
    LoReFT ``{weight, bias, rotate_layer (d, r) fp32}``, the other classes their full default
    state dict (``embed_dim``/``interchange_dim`` int64 buffers, the (d, r) ``original`` and the
    d x d ``base`` of torch's orthogonal parametrization, reproducing R exactly). ``key_format``:
    "new" (pyvene >= 0.1.7) or "old" (<= 0.1.6, dotted keys). ``include_model``: also write the
    trainable base-model parameters to ``pytorch_model.bin`` when there are any.
    """
    entries = _entries(reft_model)
    keys = _keys([e[1:5] for e in entries], key_format)
    files, reps, types, dims = {}, [], [], []
    for key, (_, layer, comp, unit, n, iv) in zip(keys, entries):
        cls = _class_name(iv)
        t = _tensors_from_module(iv, cls)
        d, r = _dims(t, cls)
        sd = iv.pyreft_state_dict() if hasattr(iv, "pyreft_state_dict") else canonical_to_pyreft(t, cls)
        files[f"intkey_{key}.bin"] = OrderedDict((k, v.detach().cpu()) for k, v in sd.items())
        reps.append([layer, comp, unit, n, r] + [None] * 9)
        types.append(f"<class 'pyreft.interventions.{cls}'>")
        dims.append(d)
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = "4.45.1"
    config = {"intervention_constant_sources": [True] * len(keys),
              "intervention_dimensions": dims, "intervention_types": types, "mode": "parallel",
              "representations": reps, "sorted_keys": keys, "transformers_version": tf_version}
    base = _trainable_base(reft_model) if include_model else {}

    def write(tmp):
        for name, sd in files.items():
            torch.save(sd, os.path.join(tmp, name))
        if base:
            torch.save({k: v.detach().cpu().clone() for k, v in base.items()},
                       os.path.join(tmp, PYREFT_BASE))
        with open(os.path.join(tmp, PYREFT_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _atomic_write_dir(save_directory, write)
