"""reft_kernels: a fast, drop-in engine for ReFT (``import reft_kernels as pyreft``).

Every public name loads its submodule on first use (PEP 562 module ``__getattr__``), so
``import reft_kernels`` and ``reft-kernels --help`` import neither torch nor transformers;
``reft_kernels.LoreftIntervention`` imports :mod:`reft_kernels.interventions.modules` (and torch) then.
``import reft_kernels.ops`` stays free of transformers.

Every public name of pyreft 0.1.0 is here, including its submodule paths (``reft_kernels.utils``,
``reft_kernels.reft_trainer``, ...: ``_PYREFT_SUBMODULES`` maps each to its home here);
:func:`as_pyreft` installs this package as ``pyreft`` in
``sys.modules`` (``python -m reft_kernels.compat.pyreft.alias script.py`` runs a pyreft script as is).
"""
from importlib import import_module

# public name -> the submodule that defines it (one home per name)
_EXPORTS = {
    "ReftConfig": "model.config",
    "ConsreftIntervention": "interventions.modules", "DireftIntervention": "interventions.modules",
    "LobireftIntervention": "interventions.modules", "LoreftIntervention": "interventions.modules",
    "NodireftIntervention": "interventions.modules", "NoreftIntervention": "interventions.modules",
    "OrthonormalRotation": "interventions.rotation",
    "ReftModel": "model.reft_model", "get_reft_model": "model.reft_model",
    "TaskType": "utils",
    "as_pyreft": "compat.pyreft.alias",
    # data side (issue 4)
    "ReftClassificationDataset": "data.classes", "ReftDataset": "data.classes",
    "ReftGenerationDataset": "data.classes", "ReftSupervisedDataset": "data.classes",
    "make_classification_data_module": "data.datasets",
    "ReftRawDataset": "data.classes",
    "ReftPreferenceDataset": "data.preference", "ReftRewardDataset": "data.preference",
    "ReftRewardCollator": "data.preference",
    "ReftDataCollator": "data.positions", "get_intervention_locations": "data.positions",
    "make_data_collator": "data.positions", "make_generation_inputs": "data.positions",
    "parse_positions": "data.positions",
    "make_last_position_supervised_chat_data_module": "data.datasets",
    "make_last_position_supervised_data_module": "data.datasets",
    "make_multiple_position_supervised_data_module": "data.datasets",
    # trainers (import transformers)
    "ReftTrainer": "training.trainer", "ReftTrainerForCausalLM": "training.trainer",
    "ReftTrainerForCausalLMDistributed": "training.trainer", "ReftTrainerForSequenceClassification": "training.trainer",
    # frozen-prefix activation cache and the base model's dtype (issue 18)
    "PrefixCacheCallback": "model.prefix_cache", "resolve_dtype": "model.precision",
    "LabelledLogitsCallback": "model.labelled_logits",
}

# pyreft's submodule names (``pyreft.utils`` ...) -> their home here: attributes of this package
# (listed by dir() before their first use) and, under as_pyreft(), ``import pyreft.<name>``
_PYREFT_SUBMODULES = {"config": "model.config", "dataset": "data.datasets",
                      "interventions": "interventions", "reft_model": "model.reft_model",
                      "reft_trainer": "training.reft_trainer", "utils": "utils"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _PYREFT_SUBMODULES:
        return import_module(f".{_PYREFT_SUBMODULES[name]}", __name__)
    try:  # a submodule used as an attribute: reft_kernels.ops after a bare `import reft_kernels`
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_PYREFT_SUBMODULES))
