"""Does a parsed checkpoint fit the model and config it is loaded into? And building its modules.

Every check raises :class:`~.spec.CheckpointError` naming the intervention key, the expected and
the found value, and touches nothing: a load validates everything before it changes the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..interventions.modules import intervention_class
from ..families import hidden_size, resolve_site
from ..interventions.rotation import without_rng_parity_draw
from .spec import PROJECTED, CheckpointError, InterventionSpec, _class_name, _dims
from .tensors import _tensors_from_module


def _expected_dim(model, spec: InterventionSpec):
    """(embed_dim the model gives this site, or None if unknown; error text or None)."""
    try:
        site = resolve_site(model, spec.layer, spec.component)
    except (ValueError, TypeError) as e:
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


def check_interventions_fit(model, specs, tensors, where):
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


def check_base_fits(model, sd, where):
    """Every saved base-model tensor names a parameter/buffer of ``model`` of the same shape."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, v in sd.items():
        if name not in params:
            raise CheckpointError(f"{where}: base-model parameter {name!r} does not exist in "
                                  f"{type(model).__name__}")
        _check_shape(params[name], v, f"{where}: base-model parameter {name!r}")


def _check_shape(expected, found, what: str, expected_note: str = "", found_note: str = "") -> None:
    if tuple(expected.shape) != tuple(found.shape):
        raise CheckpointError(f"{what} expected shape {tuple(expected.shape)}{expected_note}, "
                              f"found {tuple(found.shape)}{found_note}")


def check_module_fits(iv, t, cls, where):
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
        _check_shape(have[name], v, f"{where}: {name}", " (the config's module)", " in the checkpoint")
    if cls in PROJECTED and "proj_layer.bias" in have and "proj_layer.bias" not in t:
        raise CheckpointError(f"{where}: the {cls} has add_bias=True but the checkpoint has no "
                              f"proj_layer.bias")


def saved_completion(t):
    """The rotation base's completion that tensors ``t`` hold: "hartley" (a seed), "pyreft" (a
    d x d base), "compact" (reflectors, neither: every file from before the option), or None (no
    Householder state: a bare R or a Cholesky-QR basis)."""
    if "rotate_layer.completion_seed" in t:
        return "hartley"
    if "rotate_layer.base" in t:
        return "pyreft"
    return "compact" if "rotate_layer.reflectors" in t else None


def build_module(spec: InterventionSpec, t, dtype):
    """A fresh intervention module of the class, sizes and settings of ``spec`` and tensors ``t``."""
    d, r = _dims(t, spec.cls)
    kw = {"embed_dim": d, "low_rank_dimension": r, "dtype": dtype, "dropout": spec.dropout,
          "act_fn": spec.act_fn}
    if "rotate_layer.basis" in t:  # saved with the Cholesky-QR map: resume with it, exactly
        kw["orthogonal_map"] = "cholesky_qr"
    completion = saved_completion(t)   # the state decides (reft_config.json records it too)
    if completion is not None:
        kw["completion"] = completion
    if spec.cls in PROJECTED:
        kw["add_bias"] = "proj_layer.bias" in t if spec.add_bias is None else bool(spec.add_bias)
    with torch.random.fork_rng(devices=[]), without_rng_parity_draw():  # init values we overwrite
        return intervention_class(spec.cls)(**kw)

