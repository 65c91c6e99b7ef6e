"""reft_kernels: a fast, drop-in engine for ReFT (``import reft_kernels as pyreft``).

Every public name of pyreft 0.1.0 is here, including the submodule paths ``reft_kernels.utils``
and ``reft_kernels.reft_trainer``; :func:`as_pyreft` installs this package as ``pyreft`` in
``sys.modules`` (``python -m reft_kernels.pyreft_alias script.py`` runs a pyreft script as is).

``import reft_kernels.ops`` stays free of transformers; nothing here imports it either.
"""
import importlib

from .config import ReftConfig
from .interventions import (ConsreftIntervention, DireftIntervention, LobireftIntervention,
                            LoreftIntervention, NodireftIntervention, NoreftIntervention,
                            OrthonormalRotation)
from .reft_model import ReftModel, get_reft_model
from .utils import TaskType

# data side and trainers (issue 4); the trainers import transformers, so they load on first use
from .dataset import (ReftClassificationDataset, ReftDataCollator, ReftDataset,  # noqa: E402
                      ReftGenerationDataset, ReftPreferenceDataset, ReftRawDataset, ReftRewardCollator,
                      ReftRewardDataset, ReftSupervisedDataset, get_intervention_locations,
                      make_classification_data_module,
                      make_data_collator, make_generation_inputs, make_last_position_supervised_chat_data_module,
                      make_last_position_supervised_data_module, make_multiple_position_supervised_data_module,
                      parse_positions)

_TRAINERS = ("ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
             "ReftTrainerForSequenceClassification")
_LAZY_SUBMODULES = ("reft_trainer", "trainer")


def as_pyreft(name: str = "pyreft", replace: bool = False):
    """Install reft_kernels as ``pyreft`` in ``sys.modules`` (see :mod:`reft_kernels.pyreft_alias`)."""
    from .pyreft_alias import as_pyreft as install
    return install(name, replace)


def __getattr__(name):
    if name in _TRAINERS:
        from . import trainer
        return getattr(trainer, name)
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'reft_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TRAINERS) | set(_LAZY_SUBMODULES))
