"""pyreft's ``pyreft.reft_trainer`` module path: the trainers of :mod:`reft_kernels.training.trainer`
plus the collator helpers pyreft defines there. Importing it imports transformers.
"""
from ..data.positions import ReftDataCollator, make_data_collator
from .trainer import (ReftTrainer, ReftTrainerForCausalLM, ReftTrainerForCausalLMDistributed,
                      ReftTrainerForSequenceClassification, make_dataloader)

__all__ = ["ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
           "ReftTrainerForSequenceClassification", "ReftDataCollator", "make_data_collator",
           "make_dataloader"]
