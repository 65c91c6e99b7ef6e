"""Save and load ReFT checkpoints: our safetensors format, and pyreft/pyvene directories.

Formats
-------
* **reft_kernels** (written by :func:`save_reft_model`, :mod:`.ours`): ``reft_config.json``
  (everything needed to rebuild: per intervention class, layer, component, embed_dim, rank,
  dtype, dropout, act_fn, add_bias, key) + ``adapter.safetensors`` (+ ``base_model.safetensors``
  when base-model parameters were trainable). Reading it never unpickles anything.
* **pyreft / pyvene** (read by :func:`load_reft_model`, written by :func:`export_pyreft`,
  :mod:`.pyreft_format`): ``config.json`` (a pyvene ``IntervenableConfig``) + one
  ``intkey_<key>.bin`` (``torch.save``) per intervention + optional ``pytorch_model.bin``.
  Trainer checkpoints (``.../intervenable_model``) have no ``config.json``: pass ``config=``.

Modules: :mod:`.spec` (intervention specs, keys, canonical tensor checks, CheckpointError),
:mod:`.tensors` (canonical tensors <-> our modules and pyreft state dicts), :mod:`.files`
(atomic writes, pickle-free readers), :mod:`.ours`, :mod:`.pyreft_format`, :mod:`.validate`
(checks against the model), :mod:`.api` (the functions below). None imports
``reft_kernels.model.reft_model``: :func:`load_reft_model` is handed ``get_reft_model``.
"""
from .api import (LoadedCheckpoint, load_base_state, load_reft_model, load_weights, read_checkpoint,
                  read_for_model, save_reft_model, export_pyreft, set_default_wrapper)
from .dir_merge import write_checkpoint_dir
from .ours import BASE_WEIGHTS_NAME, CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from .pyreft_format import PYREFT_BASE, PYREFT_CONFIG
from .spec import (CLASSES, PROJECTED, ROTATED, VECTOR_SOURCE, CheckpointError, InterventionSpec,
                   _keys, check_finite, intervention_key)
from .tensors import (canonical_from_pyreft, canonical_to_pyreft, rotation_from_pyreft,
                      rotation_to_pyreft)

__all__ = ["save_reft_model", "load_reft_model", "load_weights", "export_pyreft", "read_checkpoint",
           "read_for_model", "load_base_state", "LoadedCheckpoint", "set_default_wrapper",
           "CheckpointError", "InterventionSpec", "intervention_key", "check_finite",
           "rotation_from_pyreft", "rotation_to_pyreft", "canonical_from_pyreft",
           "canonical_to_pyreft", "write_checkpoint_dir",
           "CONFIG_NAME", "WEIGHTS_NAME", "BASE_WEIGHTS_NAME", "PYREFT_CONFIG", "PYREFT_BASE",
           "FORMAT", "FORMAT_VERSION", "CLASSES", "ROTATED", "PROJECTED", "VECTOR_SOURCE"]
