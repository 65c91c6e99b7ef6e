"""Our checkpoint format: ``reft_config.json`` + ``adapter.safetensors`` (+ ``base_model.safetensors``).

``reft_config.json`` holds everything needed to rebuild (``format``, ``format_version``, the
model's class and sizes, and per intervention an :class:`~.spec.InterventionSpec`: class, layer,
component, embed_dim, rank, dtype, dropout, act_fn, add_bias, key); ``adapter.safetensors`` the
canonical tensors as ``<key>.<tensor name>``; ``base_model.safetensors`` the trainable base-model
parameters, when there are any. Reading it never unpickles anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

from ..interventions.modules import as_dtype
from .files import read_json, read_safetensors, write_json
from .spec import (CheckpointError, InterventionSpec, _check_tensor_set, _class_name, _dims,
                   _spec_from_module, _specs_from_config, check_finite)
from .tensors import _tensors_from_module

CONFIG_NAME = "reft_config.json"
CARD_NAME = "README.md"
CARD_MARKER = "<!-- model card written by reft_kernels; saving again replaces it -->"
WEIGHTS_NAME = "adapter.safetensors"
BASE_WEIGHTS_NAME = "base_model.safetensors"
FORMAT = "reft_kernels"
FORMAT_VERSION = 1

_NONE = type(None)
# reft_config.json "interventions" entry fields: the JSON types each may have
_FIELD_TYPES = {"key": (str,), "cls": (str,), "layer": (int, _NONE), "component": (str,),
                "unit": (str,), "max_number_of_units": (int,), "embed_dim": (int, _NONE),
                "rank": (int, _NONE), "dtype": (str, _NONE), "dropout": (int, float),
                "act_fn": (str, _NONE), "add_bias": (bool, _NONE), "completion": (str, _NONE)}
_REQUIRED_FIELDS = ("key", "cls", "layer", "component")
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", _NONE: "null"}
_RESAVE = "the file is corrupt or was edited by hand: restore it, or save the checkpoint again"


# --------------------------------------------------------------------------------------------
# writing

def our_layout(entries, model_meta: dict, extras: dict, base_names, library_version: str):
    """(flat tensors for adapter.safetensors, the reft_config.json dict) of ``entries``.

    ``entries``: [(key, layer, component, unit, max_number_of_units, module)] in config order.
    """
    specs, flat = [], {}
    for key, layer, comp, unit, n, iv in entries:
        spec = InterventionSpec(key=key, layer=layer, component=comp, unit=unit,
                                max_number_of_units=n, **_spec_from_module(iv))
        t = _tensors_from_module(iv, spec.cls)
        spec.embed_dim, spec.rank = _dims(t, spec.cls)
        specs.append(spec)
        flat.update({f"{key}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in t.items()})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": library_version,
        "model": model_meta, "config": extras, "base_model_parameters": sorted(base_names),
        "interventions": [asdict(s) for s in specs],
    }
    return flat, meta


def _card_tag(cls: str) -> str:
    """``LoreftIntervention`` -> ``loreft`` (the Hub tag of an intervention class)."""
    return cls[:-len("Intervention")].lower() if cls.endswith("Intervention") else cls.lower()


def model_card(meta: dict, base_model: Optional[str], name: str, n_adapter: int, n_base: int) -> str:
    """The README.md saved with an adapter: Hub YAML front matter and a short description.

    ``meta``: the reft_config.json dict; ``base_model``: the base model's Hub id or path
    (``config._name_or_path``; None/"" when unknown); ``name``: the checkpoint directory's name
    (for the loading snippet); ``n_adapter`` / ``n_base``: trainable parameters saved in the
    interventions / in base_model.safetensors.
    """
    tags = ["reft"] + list(dict.fromkeys(_card_tag(e["cls"]) for e in meta["interventions"]))
    front = ["---", "library_name: reft_kernels"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")  # a JSON string is a YAML string
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", "", CARD_MARKER, ""]
    model_class = meta.get("model", {}).get("class") or "AutoModelForCausalLM"
    title = f"ReFT adapter for {base_model}" if base_model else "ReFT adapter"
    body = [f"# {title}", "", f"Saved by reft_kernels {meta.get('library_version', '')} "
            f"(format {meta['format']} v{meta['format_version']}).", "",
            "| key | class | layer | component | rank |", "|---|---|---|---|---|"]
    body += [f"| `{e['key']}` | {e['cls']} | {e['layer']} | {e['component']} | {e.get('rank')} |"
             for e in meta["interventions"]]
    body += ["", f"Trainable parameters: {n_adapter:,} in the interventions"
             + (f", {n_base:,} in the base model (`{BASE_WEIGHTS_NAME}`)." if n_base else ".")]
    loader = base_model or "<base model directory or Hub id>"
    wrapper = None
    if not _is_transformers_class(model_class):  # e.g. a PeftModel: load its base, wrap it again
        wrapper, model_class = model_class, "AutoModelForCausalLM"
    body += ["", "Load it:", "", "```python", "import reft_kernels",
             f"from transformers import {model_class}", "",
             f"model = {model_class}.from_pretrained({json.dumps(loader)})"]
    if wrapper is not None:
        body += [f"# saved from a {wrapper}: wrap the base model the same way here (e.g. "
                 "peft.get_peft_model(model, lora_config))"]
    body += [
             f"reft_model = reft_kernels.ReftModel.from_pretrained({json.dumps(name)}, model)",
             "```", ""]
    return "\n".join(front + body)


def _is_transformers_class(name: str) -> bool:
    import transformers
    return name.isidentifier() and hasattr(transformers, name)


def write_ours(directory, flat: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], meta,
               card: Optional[str] = None):
    """Write the files into ``directory`` (an empty temp dir; see files.atomic_write_dir);
    ``card``: README.md text, or None to write none."""
    from safetensors.torch import save_file

    save_file(flat, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    if base:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in base.items()},
                  os.path.join(directory, BASE_WEIGHTS_NAME), metadata={"format": FORMAT})
    write_json(os.path.join(directory, CONFIG_NAME), meta)
    if card is not None:
        with open(os.path.join(directory, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(card)


# --------------------------------------------------------------------------------------------
# reading

def _check_meta(meta: dict, where: str) -> None:
    """The fields of reft_config.json this version relies on are present and well typed."""
    if "format" not in meta:
        raise CheckpointError(f"{where} has no 'format' field, so it is not a reft_kernels "
                              f"checkpoint config; {_RESAVE}")
    version = meta.get("format_version", 0)
    if meta["format"] != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {meta.get('format')!r} version {version!r} is not "
                              f"readable by this version (reads {FORMAT!r} <= {FORMAT_VERSION}); "
                              f"upgrade reft_kernels")
    for name, kind in (("model", dict), ("config", dict)):
        if name in meta and not isinstance(meta[name], kind):
            raise CheckpointError(f"{where}: field {name!r} must be a JSON object, found "
                                  f"{type(meta[name]).__name__}; {_RESAVE}")
    entries = meta.get("interventions")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{where}: field 'interventions' must be a non-empty list (one entry "
                              f"per intervention), found {entries!r:.80}; {_RESAVE}")
    for i, e in enumerate(entries):
        at = f"{where}: interventions[{i}]"
        if not isinstance(e, dict):
            raise CheckpointError(f"{at} must be a JSON object, found {type(e).__name__}; {_RESAVE}")
        missing = [f for f in _REQUIRED_FIELDS if f not in e]
        if missing:
            raise CheckpointError(f"{at} lacks the required fields {missing}; {_RESAVE}")
        for name, kinds in _FIELD_TYPES.items():
            v = e.get(name)
            if name in e and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
                raise CheckpointError(f"{at}: field {name!r} = {v!r} should be "
                                      f"{' or '.join(_JSON_NAMES[k] for k in kinds)}; {_RESAVE}")
        try:
            _class_name(e["cls"])
            if e.get("dtype") is not None:
                as_dtype(e["dtype"])
        except (CheckpointError, TypeError) as err:
            raise CheckpointError(f"{at}: {err}; {_RESAVE}") from None


def _specs_from_meta(meta: dict, where: str) -> List[InterventionSpec]:
    _check_meta(meta, where)
    return [InterventionSpec(**{k: v for k, v in e.items() if k in _FIELD_TYPES})
            for e in meta["interventions"]]


def read_ours(path, config):
    """(specs, objects, canonical tensors, base state dict, meta) of a directory in our format.

    Uses only json and safetensors (no pickle). ``config``, when given, defines the specs and
    the intervention objects; otherwise they come from ``reft_config.json`` (objects None).
    """
    config_file = os.path.join(path, CONFIG_NAME)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    meta = read_json(config_file)
    file_specs = _specs_from_meta(meta, config_file)
    flat = read_safetensors(weights_file)
    check_finite(flat, weights_file)
    if config is not None:
        specs, objs = _specs_from_config(config)
    else:
        specs, objs = file_specs, [None] * len(file_specs)
    tensors = []
    for spec in specs:
        t = {k[len(spec.key) + 1:]: v for k, v in flat.items() if k.startswith(spec.key + ".")}
        if not t:
            raise CheckpointError(f"{weights_file}: no tensors for intervention {spec.key!r}; the "
                                  f"file holds keys of {sorted({k.rsplit('#', 1)[0] for k in flat})}")
        _check_tensor_set(t, spec.cls, f"{weights_file}[{spec.key}]")
        tensors.append(t)
    base_file = os.path.join(path, BASE_WEIGHTS_NAME)
    base = read_safetensors(base_file) if os.path.isfile(base_file) else {}
    check_finite(base, base_file)
    return specs, objs, tensors, base, meta
