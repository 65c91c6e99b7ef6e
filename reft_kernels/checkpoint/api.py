"""Save, load and export a wrapped model; parse a checkpoint directory.

These functions see a ReftModel only through what it holds (``interventions``, an ordered
mapping key -> module; ``config.representations``; ``model``, the base model). They never build
one themselves: :func:`read_for_model` returns the plain pieces (a ReftConfig holding the loaded
intervention modules, and the base-model state dict), and :func:`load_reft_model` hands them to
``wrap`` (``reft_kernels.get_reft_model``, which registers itself as the default through
:func:`set_default_wrapper`). So nothing in this package imports ``reft_kernels.model.reft_model``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..model.config import ReftConfig
from ..interventions.modules import as_dtype
from .dir_merge import recover, write_checkpoint_dir
from .files import resolve_dir
from .ours import BASE_WEIGHTS_NAME, CARD_MARKER, CARD_NAME, CONFIG_NAME, FORMAT, WEIGHTS_NAME, model_card as model_card_text, our_layout, read_ours, write_ours
from .pyreft_format import PYREFT_BASE, PYREFT_CONFIG, pyreft_layout, read_pyreft, write_pyreft
from .spec import _rep_fields
from .tensors import _load_into_module
from ..families import hidden_size, num_layers
from .validate import build_module, check_base_fits, check_interventions_fit, check_module_fits

_default_wrap: Optional[Callable] = None


def set_default_wrapper(wrap: Callable) -> None:
    """Set how :func:`load_reft_model` wraps a model: ``wrap(model, reft_config, **kwargs)``.

    ``reft_kernels.model.reft_model`` registers ``get_reft_model`` here when it is imported (which
    ``import reft_kernels`` always does).
    """
    global _default_wrap
    _default_wrap = wrap


@dataclass
class LoadedCheckpoint:
    """A checkpoint read and checked against a model, ready to wrap it (nothing attached yet).

    ``config``: a ReftConfig whose representations hold the intervention modules, weights
    loaded, on the model's device. ``base_state``: saved base-model parameters (may be empty).
    """
    config: ReftConfig
    base_state: Dict[str, torch.Tensor]
    format: str
    meta: dict


# --------------------------------------------------------------------------------------------
# reading

def read_checkpoint(path, config=None):
    """Parse a checkpoint directory without touching any model.

    Returns ``(format, specs, objects, tensors, base_state_dict, meta)``; ``objects`` are the
    intervention objects of ``config`` (or None each) and ``tensors`` the canonical weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    recover(path)   # finish a save that was interrupted while moving its files in
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        specs, objs, tensors, base, meta = read_ours(path, config)
        return FORMAT, specs, objs, tensors, base, meta
    specs, objs, tensors, base = read_pyreft(path, config)
    return "pyreft", specs, objs, tensors, base, {}


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _prepare(path, model, config, dtype):
    """Read + validate everything and build (unattached) modules; touches nothing of ``model``."""
    fmt, specs, objs, tensors, base, meta = read_checkpoint(path, config)
    where = os.fspath(path)
    if meta.get("model", {}).get("class") not in (None, type(model).__name__):
        warnings.warn(f"{where} was saved from a {meta['model']['class']}, loading it into a "
                      f"{type(model).__name__}", stacklevel=4)
    check_interventions_fit(model, specs, tensors, where)
    if base:
        check_base_fits(model, base, where)
    for spec, obj, t in zip(specs, objs, tensors):
        if obj is not None:
            check_module_fits(obj, t, spec.cls, f"{where}: intervention {spec.key!r}")
    modules = []
    for spec, obj, t in zip(specs, objs, tensors):
        if obj is None:
            dt = dtype if dtype is not None else spec.dtype or _model_dtype(model)
            obj = build_module(spec, t, as_dtype(dt))
        modules.append(obj)
    return fmt, specs, modules, tensors, base, meta


def read_for_model(load_directory, model, config=None, *, dtype=None, local_directory=None,
                   from_huggingface_hub: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint for ``model`` and build its interventions; ``model`` is not touched.

    Arguments as :func:`load_reft_model`. The returned config's intervention modules carry the
    checkpoint's weights; wrap the model with it (``get_reft_model(model, loaded.config)``) and
    copy ``loaded.base_state`` in with :func:`load_base_state`.
    """
    path = resolve_dir(load_directory, local_directory, from_huggingface_hub)
    fmt, specs, modules, tensors, base, meta = _prepare(path, model, config, dtype)
    for spec, iv, t in zip(specs, modules, tensors):
        _load_into_module(iv, t, spec.cls)
    device = _model_device(model)
    modules = [m.to(device) for m in modules]
    reps = [{"layer": s.layer, "component": s.component, "unit": s.unit,
             "max_number_of_units": s.max_number_of_units,
             "low_rank_dimension": m.config_kwargs()["low_rank_dimension"], "intervention": m}
            for s, m in zip(specs, modules)]
    extras = meta.get("config", {}) if config is None else {}
    try:
        reft_config = ReftConfig(representations=reps, **extras)
    except TypeError:  # a config without the extra fields
        reft_config = ReftConfig(representations=reps)
    return LoadedCheckpoint(config=reft_config, base_state=base, format=fmt, meta=meta)


def load_base_state(model, base) -> None:
    """Copy saved base-model tensors into ``model``; the parameters among them become trainable."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, v in base.items():
            if name in params:
                params[name].copy_(v)
                params[name].requires_grad_(True)
            else:
                model.get_buffer(name).copy_(v)


def load_reft_model(load_directory, model, config=None, *, dtype=None, include_model: bool = True,
                    local_directory=None, from_huggingface_hub: bool = False,
                    wrap: Optional[Callable] = None, **get_reft_model_kwargs):
    """Load a ReFT checkpoint (our format or pyreft's) onto ``model``; returns a ReftModel.

    ``config``: a ReftConfig whose interventions define class, dtype, dropout and act_fn (needed
    for pyreft trainer checkpoints, which have no config.json; pyreft's config.json records
    neither dtype, dropout nor act_fn). ``dtype``: of the learned_source/proj_layer weights of
    interventions built from the checkpoint; default: the saved dtype for our format, the
    model's dtype for pyreft's. ``include_model``: also load saved base-model parameters
    (``base_model.safetensors`` / ``pytorch_model.bin``), which are then left trainable.
    ``local_directory``/``from_huggingface_hub``: as pyvene's, for a Hub repo id (downloaded with
    ``huggingface_hub.snapshot_download``). ``wrap(model, reft_config, **kwargs)`` builds the
    ReftModel (default: ``reft_kernels.get_reft_model``); other keywords go to it.

    Everything is read and checked before ``model`` is touched: on any error (CheckpointError
    names the file or intervention key, the expected and the found value) the model is unchanged.
    """
    wrap = wrap if wrap is not None else _default_wrap
    if wrap is None:  # only if reft_kernels.model.reft_model was never imported
        raise RuntimeError("load_reft_model needs wrap=reft_kernels.get_reft_model (import "
                           "reft_kernels first)")
    loaded = read_for_model(load_directory, model, config, dtype=dtype,
                            local_directory=local_directory, from_huggingface_hub=from_huggingface_hub)
    reft_model = wrap(model, loaded.config, **get_reft_model_kwargs)
    if include_model and loaded.base_state:
        load_base_state(reft_model.model, loaded.base_state)
    return reft_model


# --------------------------------------------------------------------------------------------
# an existing ReftModel

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


def load_weights(reft_model, load_directory, include_model: bool = True) -> None:
    """Load checkpoint weights into an existing ReftModel (pyvene's ``load_intervention``).

    Interventions are matched by key (either key generation). Validated before anything changes.
    """
    entries = _entries(reft_model)
    reps = [{"layer": e[1], "component": e[2], "unit": e[3], "max_number_of_units": e[4],
             "intervention": e[5]} for e in entries]

    class _Cfg:  # the model's own layout as a config
        representations = reps

    _, specs, _, tensors, base, _ = _prepare(load_directory, reft_model.model, _Cfg, None)
    for spec, (_, *_, iv), t in zip(specs, entries, tensors):
        _load_into_module(iv, t, spec.cls)
    if include_model and base:
        load_base_state(reft_model.model, base)


def _is_pyvene_config(path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "representations" in data and "intervention_types" in data


def _owned(directory, name) -> bool:
    """Whether the existing file ``directory/name`` is a ReFT checkpoint file (ours or pyreft's),
    which a save may replace or remove; anything else is the user's and is never touched."""
    path = os.path.join(directory, name)
    if name in (CONFIG_NAME, WEIGHTS_NAME, BASE_WEIGHTS_NAME) or (name.startswith("intkey_") and name.endswith(".bin")):
        return True
    if name == CARD_NAME:
        return _user_card(directory) is None
    if name == PYREFT_CONFIG:
        return _is_pyvene_config(path)
    if name == PYREFT_BASE:   # trainable base weights of a pyreft checkpoint, not a HF model's weights
        return _is_pyvene_config(os.path.join(directory, PYREFT_CONFIG)) or any(
            n.startswith("intkey_") and n.endswith(".bin") for n in os.listdir(directory))
    return False


def _library_version():
    try:
        from importlib.metadata import version
        return version("reft_kernels")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "0.1.0"


def _model_meta(model) -> dict:
    """What the checkpoint records about the base model (read from the family table's config fields)."""
    return {"class": type(model).__name__, "hidden_size": hidden_size(model), "num_hidden_layers": num_layers(model)}


def _config_extras(reft_model):
    """Position settings a config may carry (``positions="f1+l1"``, ``share_weights``)."""
    cfg = getattr(reft_model, "config", None)
    return {n: getattr(cfg, n) for n in ("positions", "share_weights")
            if isinstance(getattr(cfg, n, None), (str, bool, int))}


def _user_card(save_directory) -> Optional[str]:
    """The path of a README.md in ``save_directory`` that we did not write (None if there is none)."""
    card = os.path.join(os.fspath(save_directory), CARD_NAME)
    if not os.path.isfile(card):
        return None
    with open(card, encoding="utf-8", errors="replace") as f:
        return None if CARD_MARKER in f.read() else card


def _write_checkpoint(save_directory, write: Callable[[str], None]) -> str:
    """write_checkpoint_dir with our ownership rule; a README.md the user wrote is kept (no card)."""
    keep_user_card = os.path.isdir(os.fspath(save_directory)) and _user_card(save_directory) is not None

    def write_all(folder):
        write(folder)
        card = os.path.join(folder, CARD_NAME)
        if keep_user_card and os.path.exists(card):
            os.remove(card)
    return write_checkpoint_dir(save_directory, write_all, _owned)


def _base_model_name(model) -> Optional[str]:
    """The base model's Hub id or path (``config._name_or_path``), or None when unknown."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def save_reft_model(reft_model, save_directory, include_model: bool = True,
                    model_card: bool = True) -> str:
    """Save ``reft_model`` in our format; returns the directory's absolute path.

    Writes ``reft_config.json`` + ``adapter.safetensors`` (+ ``base_model.safetensors`` holding
    the trainable base-model parameters when ``include_model`` and there are any) + a model card
    ``README.md`` when ``model_card`` (Hub front matter: ``library_name``, ``base_model`` from
    ``config._name_or_path``, tags; the interventions, trainable parameter counts, how to load
    it). ``save_directory`` may exist and hold other files (a run directory, a Trainer output
    directory): only the checkpoint's own files are written, the previous save's checkpoint
    files are replaced, everything else (a README.md the user wrote included: then no card) is
    left alone; crash-safe, see :mod:`reft_kernels.checkpoint.dir_merge`.
    """
    base = _trainable_base(reft_model) if include_model else {}
    entries = _entries(reft_model)
    flat, meta = our_layout(entries, _model_meta(reft_model.model),
                            _config_extras(reft_model), base, _library_version())
    card = None
    if model_card:
        n_adapter = sum(p.numel() for *_, iv in entries for p in iv.parameters() if p.requires_grad)
        name = os.path.basename(os.path.abspath(os.fspath(save_directory)))
        card = model_card_text(meta, _base_model_name(reft_model.model), name, n_adapter,
                               sum(v.numel() for v in base.values()))
    return _write_checkpoint(save_directory, lambda tmp: write_ours(tmp, flat, base, meta, card))


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
    files, config = pyreft_layout(_entries(reft_model), key_format)
    base = _trainable_base(reft_model) if include_model else {}
    return _write_checkpoint(save_directory, lambda tmp: write_pyreft(tmp, files, base, config))
