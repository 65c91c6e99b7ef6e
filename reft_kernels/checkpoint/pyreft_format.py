"""pyreft / pyvene checkpoint directories: ``config.json`` + ``intkey_<key>.bin`` (+ ``pytorch_model.bin``).

``config.json`` is a pyvene ``IntervenableConfig`` (positional representation lists,
``intervention_types`` as ``"<class 'pyreft.interventions.X'>"``, ``sorted_keys``); trainer
checkpoints (``.../intervenable_model``) have none, so the caller passes ``config=``. Both key
generations are read (pyvene <= 0.1.6 ``layer.15.comp.block_output.unit.pos.nunit.1#0``, >= 0.1.7
``layer_15_comp_block_output_unit_pos_nunit_1#0``); ``.bin`` files are read with
``torch.load(weights_only=True)``. Per intervention the state dict is LoReFT's slim
``{weight, bias, rotate_layer}`` or a class's full ``state_dict()`` (see :mod:`.tensors`).
"""
from __future__ import annotations

from collections import OrderedDict

import os

import torch

from .files import read_json, read_torch_bin, write_json
from .ours import CONFIG_NAME
from .spec import (PROJECTED, CheckpointError, InterventionSpec, _class_name, _dims, _keys,
                   _rep_fields, _specs_from_config, check_finite)
from .tensors import _tensors_from_module, canonical_from_pyreft, canonical_to_pyreft

PYREFT_CONFIG = "config.json"
PYREFT_BASE = "pytorch_model.bin"
_RESAVE = "the file is corrupt or was edited by hand: restore it, or export the checkpoint again"


def _specs_from_pyvene_config(cfg: dict, where: str):
    """Specs and pyvene ``sorted_keys`` from a config.json dict; CheckpointError naming the file."""
    reps = cfg.get("representations")
    if isinstance(reps, list) and reps and not isinstance(reps[0], (list, dict)):
        reps = [reps]  # a single representation
    if not isinstance(reps, list) or not reps:
        raise CheckpointError(f"{where}: field 'representations' must be a non-empty list (one per "
                              f"intervention), found {reps!r:.80}; {_RESAVE}")
    types = cfg.get("intervention_types")
    types = types if isinstance(types, list) else [types] * len(reps)
    if len(types) != len(reps) or any(t is None for t in types):
        raise CheckpointError(f"{where}: 'intervention_types' must give one class per "
                              f"representation ({len(reps)}), found {cfg.get('intervention_types')!r:.120}; "
                              f"{_RESAVE}")
    try:
        fields = [_rep_fields(r) for r in reps]
        keys = _keys([f[:4] for f in fields], "new")
        specs = [InterventionSpec(key=k, cls=_class_name(t), layer=f[0], component=f[1],
                                  unit=f[2], max_number_of_units=f[3], rank=f[4])
                 for k, t, f in zip(keys, types, fields)]
    except (TypeError, ValueError) as e:  # CheckpointError included: add the file name
        raise CheckpointError(f"{where}: cannot read the representations ({e}); {_RESAVE}") from None
    sorted_keys = cfg.get("sorted_keys") or [None] * len(specs)
    if not isinstance(sorted_keys, list) or len(sorted_keys) != len(specs):
        raise CheckpointError(f"{where}: 'sorted_keys' must list one key per representation "
                              f"({len(specs)}), found {sorted_keys!r:.120}; {_RESAVE}")
    return specs, sorted_keys


def read_pyreft(path, config):
    """(specs, objects, canonical tensors, base state dict) of a pyreft directory.

    With ``config`` (a ReftConfig-like object) the specs come from it, else from ``config.json``.
    """
    cfg_file = os.path.join(path, PYREFT_CONFIG)
    if config is not None:
        specs, objs = _specs_from_config(config)
        sorted_keys = [None] * len(specs)
    elif os.path.isfile(cfg_file):
        specs, sorted_keys = _specs_from_pyvene_config(read_json(cfg_file), cfg_file)
        objs = [None] * len(specs)
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
        sd = read_torch_bin(os.path.join(path, f"intkey_{found}.bin"))
        check_finite(sd, where)
        t = canonical_from_pyreft(sd, spec.cls, where)
        if spec.cls in PROJECTED and spec.add_bias is None:  # pyreft does not save add_bias
            spec.add_bias = "proj_layer.bias" in t
        tensors.append(t)
    base_file = os.path.join(path, PYREFT_BASE)
    base = read_torch_bin(base_file) if os.path.isfile(base_file) else {}
    check_finite(base, base_file)
    return specs, objs, tensors, base


def pyreft_layout(entries, key_format: str = "new"):
    """({file name: state dict}, config.json dict) exactly as pyreft 0.1.0 / pyvene would save.

    ``entries``: [(key, layer, component, unit, max_number_of_units, module)] in config order.
    """
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
    return files, config


def write_pyreft(directory, files, base, config) -> None:
    """Write the intkey files, ``pytorch_model.bin`` (if ``base``) and ``config.json``."""
    for name, sd in files.items():
        torch.save(sd, os.path.join(directory, name))
    if base:
        torch.save({k: v.detach().cpu().clone() for k, v in base.items()},
                   os.path.join(directory, PYREFT_BASE))
    write_json(os.path.join(directory, PYREFT_CONFIG), config, sort_keys=True)
