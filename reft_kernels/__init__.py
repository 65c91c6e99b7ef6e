"""reft_kernels: a fast, drop-in engine for ReFT (``import reft_kernels as pyreft``).

``import reft_kernels.ops`` stays free of transformers; nothing here imports it either.
"""
from .config import ReftConfig
from .interventions import (ConsreftIntervention, DireftIntervention, LobireftIntervention,
                            LoreftIntervention, NodireftIntervention, NoreftIntervention,
                            OrthonormalRotation)
from .reft_model import ReftModel, get_reft_model

# data side and trainers (issue 4); the trainers import transformers, so they load on first use
from .dataset import (ReftClassificationDataset, ReftDataCollator, ReftDataset,  # noqa: E402
                      ReftGenerationDataset, ReftSupervisedDataset, get_intervention_locations,
                      make_classification_data_module,
                      make_data_collator, make_generation_inputs, make_last_position_supervised_chat_data_module,
                      make_last_position_supervised_data_module, make_multiple_position_supervised_data_module,
                      parse_positions)

_TRAINERS = ("ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
             "ReftTrainerForSequenceClassification")


def __getattr__(name):
    if name in _TRAINERS:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'reft_kernels' has no attribute {name!r}")
