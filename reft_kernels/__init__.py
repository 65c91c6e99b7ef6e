"""reft_kernels: a fast, drop-in engine for ReFT (``import reft_kernels as pyreft``).

Every public name loads its submodule on first use (PEP 562 module ``__getattr__``), so
``import reft_kernels`` and ``reft-kernels --help`` import neither torch nor transformers;
``reft_kernels.LoreftIntervention`` imports :mod:`reft_kernels.interventions` (and torch) then.
``import reft_kernels.ops`` stays free of transformers.

Every public name of pyreft 0.1.0 is here, including its submodule paths (``reft_kernels.utils``,
``reft_kernels.reft_trainer``, ...); :func:`as_pyreft` installs this package as ``pyreft`` in
``sys.modules`` (``python -m reft_kernels.pyreft_alias script.py`` runs a pyreft script as is).
"""
from importlib import import_module

# public name -> the submodule that defines it (one home per name)
_EXPORTS = {
    "ReftConfig": "config",
    "ConsreftIntervention": "interventions", "DireftIntervention": "interventions",
    "LobireftIntervention": "interventions", "LoreftIntervention": "interventions",
    "NodireftIntervention": "interventions", "NoreftIntervention": "interventions",
    "OrthonormalRotation": "rotation",
    "ReftModel": "reft_model", "get_reft_model": "reft_model",
    "TaskType": "utils",
    "as_pyreft": "pyreft_alias",
    # data side (issue 4)
    "ReftClassificationDataset": "dataset_classes", "ReftDataset": "dataset_classes",
    "ReftGenerationDataset": "dataset_classes", "ReftSupervisedDataset": "dataset_classes",
    "make_classification_data_module": "dataset",
    "ReftRawDataset": "dataset_classes",
    "ReftPreferenceDataset": "dataset_preference", "ReftRewardDataset": "dataset_preference",
    "ReftRewardCollator": "dataset_preference",
    "ReftDataCollator": "dataset_positions", "get_intervention_locations": "dataset_positions",
    "make_data_collator": "dataset_positions", "make_generation_inputs": "dataset_positions",
    "parse_positions": "dataset_positions",
    "make_last_position_supervised_chat_data_module": "dataset",
    "make_last_position_supervised_data_module": "dataset",
    "make_multiple_position_supervised_data_module": "dataset",
    # trainers (import transformers)
    "ReftTrainer": "trainer", "ReftTrainerForCausalLM": "trainer",
    "ReftTrainerForCausalLMDistributed": "trainer", "ReftTrainerForSequenceClassification": "trainer",
    # frozen-prefix activation cache and the base model's dtype (issue 18)
    "PrefixCacheCallback": "prefix_cache", "resolve_dtype": "precision",
    "LabelledLogitsCallback": "labelled_logits",
}

# pyreft's submodules (``pyreft.utils`` ...): listed by dir() before their first use
_PYREFT_SUBMODULES = ("config", "dataset", "interventions", "reft_model", "reft_trainer", "utils")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a submodule used as an attribute: reft_kernels.ops after a bare `import reft_kernels`
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_PYREFT_SUBMODULES))
