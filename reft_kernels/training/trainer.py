"""HF ``Trainer`` subclasses for ReFT (pyreft's ``reft_trainer.py`` API), transformers 4.45 - 5.x.

``ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=TrainingArguments(...), **data_module)``
trains a :class:`reft_kernels.ReftModel` on batches from :class:`reft_kernels.data.datasets.ReftDataCollator`.
What differs from pyreft, deliberately:

* data order: pyreft's ``ReftTrainerForCausalLM`` replaces HF's loader with a plain
  ``DataLoader(shuffle=True)`` (its sampler seeds itself from the global torch stream), which
  ignores ``dataloader_num_workers``, ``pin_memory``, ``group_by_length`` and gives another
  permutation than HF's seeded sampler. ``pyreft_data_order=True`` uses pyreft's loader (so a
  seeded run sees pyreft's batches); ``False`` keeps HF's. The default (``None``) is True when
  every rotation of the model was built with ``pyreft_base=True`` (the "follow pyreft's path"
  setting, also :func:`reft_kernels.as_pyreft`'s) and still has pyreft's d x d base, else False:
  the default ``completion="pyreft"`` alone keeps HF's loader (its workers, ``group_by_length``,
  per-rank sharding). ``ReftTrainerForSequenceClassification`` keeps HF's loader, as pyreft;
* ``compute_loss`` accepts ``num_items_in_batch`` and any future keywords, and returns the
  per-batch mean (the Trainer divides by the gradient-accumulation steps);
* checkpoints (``checkpoint-N/intervenable_model``) hold the ReFT weights *and* config
  (:func:`reft_kernels.checkpoint.save_reft_model`), so ``resume_from_checkpoint`` restores
  them in place and continues exactly, and ``load_best_model_at_end`` works;
* evaluation runs the interventions in eval mode (no dropout);
* the frozen layers below the lowest intervention run once per example, not once per epoch
  (:mod:`reft_kernels.model.prefix_cache`; exact; ``prefix_cache=False`` turns it off,
  ``prefix_cache_max_gb`` bounds it, default 1);
* the training steps compute the LM head and the loss at labelled positions only
  (:mod:`reft_kernels.model.labelled_logits`; the same loss; ``labelled_logits=False`` turns it off);
  with it, a padded batch runs in length groups without its trailing padding
  (:mod:`reft_kernels.model.length_groups`; the same loss; ``trim_padding=False`` turns it off);
* the rotation parameters are never weight-decayed (decay would pull a Householder R back
  towards its initial value and shrink a Cholesky-QR basis towards a badly conditioned one);
  ``learned_source`` is (pyreft's Trainer, by a name mismatch, decays no intervention parameter,
  so with weight decay > 0 the paths differ);
* ``ReftTrainerForSequenceClassification`` uses the standard evaluation loop and computes MSE in
  the logits' dtype (pyreft casts regression labels to bf16).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers import Trainer

__all__ = ["ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
           "ReftTrainerForSequenceClassification", "REFT_CHECKPOINT_DIR", "no_decay_parameter_names",
           "enable_gradient_checkpointing", "make_dataloader", "follows_pyreft_base"]

REFT_CHECKPOINT_DIR = "intervenable_model"   # same sub-directory name as pyreft's checkpoints
_MODEL_INPUTS = ["input_ids", "attention_mask", "intervention_locations", "labels", "label", "label_ids",
                 "token_type_ids", "position_ids", "inputs_embeds", "subspaces"]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def no_decay_parameter_names(model: nn.Module) -> set:
    """Names of parameters that must not be weight-decayed: the rotations' parametrisations.

    Covers :class:`reft_kernels.OrthonormalRotation` (``rotate_layer.reflectors``, or ``.basis``
    for the Cholesky-QR map) and torch's ``parametrizations.orthogonal`` (``...original``, where
    decay zeroes pyreft's R). pyreft's Trainer never decays them either (by a name mismatch).
    """
    names = set()
    for mname, module in model.named_modules():
        if type(module).__name__ == "OrthonormalRotation" or "parametrizations" in mname.split("."):
            for pname, _ in module.named_parameters(recurse=True):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def enable_gradient_checkpointing(reft_model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on HF gradient checkpointing in the base model of ``reft_model``.

    The edits run inside the checkpointed layers and are re-applied identically when the
    layers are recomputed in backward. With ``use_reentrant=True`` the frozen embeddings are
    made to output tensors that require grad, or no gradient would reach the interventions;
    with ``use_reentrant=False`` (default) they are not, so backward stops at the first edit.
    """
    base = getattr(reft_model, "model", reft_model)
    kwargs = {"use_reentrant": bool(use_reentrant)}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    elif not use_reentrant and hasattr(base, "_require_grads_hook"):
        # HF turns this on for every GC model; non-reentrant checkpointing does not need it, and
        # with a frozen base it would make backward run through the layers below the first edit.
        base.disable_input_require_grads()


def make_dataloader(dataset, batch_size: int, collate_fn, shuffle: bool, sampler=None):
    """pyreft's ``make_dataloader``: a plain ``torch.utils.data.DataLoader``."""
    from torch.utils.data import DataLoader
    return DataLoader(dataset, shuffle=shuffle, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)


def follows_pyreft_base(model: nn.Module) -> bool:
    """True when ``model`` has rotations and every one was built with ``pyreft_base=True`` and
    keeps pyreft's d x d base: the setting that means "follow pyreft's exact path" (the default
    ``completion="pyreft"`` has the base too, but asks for nothing about the data order)."""
    rotations = [m for m in _unwrap(model).modules() if type(m).__name__ == "OrthonormalRotation"]
    return bool(rotations) and all(getattr(m, "base", None) is not None and getattr(m, "pyreft_base", False)
                                   for m in rotations)


def _install_gc_shims(model: nn.Module) -> None:
    """Give a ReftModel without them the (de)activation methods the Trainer calls on its model."""
    base = getattr(model, "model", None)
    if base is None:
        return

    def enable(activation_checkpointing_kwargs=None, gradient_checkpointing_kwargs=None, **kw):
        kwargs = activation_checkpointing_kwargs or gradient_checkpointing_kwargs or {}
        enable_gradient_checkpointing(model, use_reentrant=kwargs.get("use_reentrant", False))

    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if not hasattr(model, name):
            object.__setattr__(model, name, enable)
    for name in ("gradient_checkpointing_disable", "activation_checkpointing_disable"):
        if not hasattr(model, name) and hasattr(base, name):
            object.__setattr__(model, name, getattr(base, name))


class ReftTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`reft_kernels.ReftModel` (see the module docstring).

    Accepts pyreft's ``tokenizer=`` keyword on every transformers version (newer ones call it
    ``processing_class``). ``pyreft_data_order``: see the module docstring.
    """

    def __init__(self, *args, pyreft_data_order: Optional[bool] = None, prefix_cache: bool = True,
                 prefix_cache_max_gb: float = 1.0, labelled_logits: bool = True, trim_padding: bool = True,
                 **kwargs):
        if pyreft_data_order not in (None, True, False):
            raise ValueError(f"pyreft_data_order={pyreft_data_order!r}; pass True (pyreft's plain shuffled "
                             "loader), False (HF's loader) or None (True when pyreft_base=True)")
        tok = kwargs.pop("processing_class", None)
        legacy = kwargs.pop("tokenizer", None)
        tok = tok if tok is not None else legacy
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            _install_gc_shims(model)
        # The tokenizer is attached after Trainer.__init__: given there, the Trainer would try to
        # align its special tokens with model.config, which is a ReftConfig, not a HF config.
        super().__init__(*args, **kwargs)
        self.pyreft_data_order = follows_pyreft_base(self.model) if pyreft_data_order is None \
            else pyreft_data_order
        self._attach_tokenizer(tok)
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.can_return_loss = True
        if prefix_cache:   # the frozen layers below the first intervention run once per example
            from ..model.prefix_cache import PrefixCacheCallback
            self.add_callback(PrefixCacheCallback(max_gb=prefix_cache_max_gb))
        if labelled_logits:   # the LM head and the loss at labelled positions only
            from ..model.labelled_logits import LabelledLogitsCallback
            self.add_callback(LabelledLogitsCallback())
        reft_model = _unwrap(self.model)
        if hasattr(reft_model, "interventions"):   # length groups without padding (with labelled logits)
            reft_model.trim_padding = bool(trim_padding)
        self.model_accepts_loss_kwargs = False   # compute_loss returns a per-batch mean
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False

    def _attach_tokenizer(self, tok) -> None:
        """Keep the tokenizer as ``reft_tokenizer`` (saved with checkpoints) and align the base model.

        It is not stored as ``processing_class``: the Trainer would align its special tokens
        with ``model.config``, which here is a ReftConfig, not a HF config.
        """
        self.reft_tokenizer = tok
        base = getattr(_unwrap(self.model), "model", None)
        if tok is not None and base is not None and hasattr(base, "config"):
            try:
                from transformers.trainer_utils import align_special_tokens
                align_special_tokens(base, tok)
            except (ImportError, AttributeError, TypeError):
                pass

    # -- data ----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(dict.fromkeys(_MODEL_INPUTS + list(self.label_names or [])))

    # -- loss ----------------------------------------------------------------------------------
    @staticmethod
    def _model_inputs(inputs: Dict[str, Any]) -> Dict[str, Any]:
        inputs = {k: v for k, v in inputs.items() if k not in ("subspaces", "id")}
        locs = inputs.get("intervention_locations")
        if locs is not None and locs.dim() != 3:
            raise ValueError(f"intervention_locations has shape {tuple(locs.shape)}; the collator must give "
                             "(B, n_interventions, P) (use reft_kernels.ReftDataCollator)")
        return inputs

    def train(self, *args, **kwargs):
        """``Trainer.train``. If it raises (an interrupt, out of memory), the prefix cache's hooks
        and the labelled-logits switch are undone as at a normal end: the Trainer calls no callback
        then, and a later ``generate`` or evaluation would still run through them."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            from ..model.labelled_logits import LabelledLogitsCallback
            from ..model.prefix_cache import PrefixCacheCallback
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, (PrefixCacheCallback, LabelledLogitsCallback)):
                    callback.on_train_end(self.args, self.state, self.control)
            raise

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        """Intervened forward; the loss is the model's (token-mean cross-entropy for causal LMs)."""
        outputs = model(**self._model_inputs(inputs))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss; the batch needs 'labels'")
        return (loss, outputs) if return_outputs else loss

    # -- optimiser -----------------------------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list:
        names = super().get_decay_parameter_names(model)
        banned = no_decay_parameter_names(model)
        return [n for n in names if n not in banned]

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        """Write ``output_dir/intervenable_model`` (ReFT weights + config), tokenizer and args."""
        from ..checkpoint import save_reft_model
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_reft_model(_unwrap(self.model), os.path.join(output_dir, REFT_CHECKPOINT_DIR))
        tok = self.reft_tokenizer
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_reft(self, checkpoint: str, model=None) -> bool:
        from ..checkpoint import load_weights
        path = os.path.join(checkpoint, REFT_CHECKPOINT_DIR)
        if not os.path.isdir(path):
            return False
        load_weights(_unwrap(model if model is not None else self.model), path)
        return True

    def _load_rng_state(self, checkpoint):
        """transformers < 4.47 reads its own ``rng_state.pth`` with torch.load's default, which is
        ``weights_only=True`` since torch 2.6 and rejects the numpy RNG state: allow just that."""
        ctx = getattr(torch.serialization, "safe_globals", None)
        if ctx is None:
            return super()._load_rng_state(checkpoint)
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with ctx(allowed):
            return super()._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_reft(resume_from_checkpoint, model):
            raise ValueError(f"{resume_from_checkpoint} has no {REFT_CHECKPOINT_DIR}/ directory; pass a "
                             "checkpoint-N directory written by a ReftTrainer")

    def _load_best_model(self):
        if not self._load_reft(self.state.best_model_checkpoint):
            super()._load_best_model()


class ReftTrainerForCausalLM(ReftTrainer):
    """pyreft's causal-LM trainer; its plain shuffled loader when ``pyreft_data_order``."""

    def get_train_dataloader(self):
        if not self.pyreft_data_order:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("the trainer has no train_dataset; pass train_dataset=... to train")
        return make_dataloader(self.train_dataset, self._train_batch_size, self.data_collator, shuffle=True)


class ReftTrainerForCausalLMDistributed(ReftTrainerForCausalLM):
    """pyreft's distributed trainer. HF's loader already shards per rank; with
    ``pyreft_data_order`` each rank reads ``DistributedSampler(shuffle=True)`` as in pyreft."""

    def get_train_dataloader(self):
        import torch.distributed as dist
        if not self.pyreft_data_order or not (dist.is_available() and dist.is_initialized()):
            return super().get_train_dataloader()
        from torch.utils.data import DistributedSampler
        return make_dataloader(self.train_dataset, self._train_batch_size, self.data_collator, shuffle=False,
                               sampler=DistributedSampler(self.train_dataset, shuffle=True))


class ReftTrainerForSequenceClassification(ReftTrainer):
    """Classification/regression loss from the logits, by ``problem_type`` (as pyreft)."""

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        inputs = self._model_inputs(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        base = getattr(_unwrap(model), "model", _unwrap(model))
        num_labels = getattr(base, "num_labels", logits.shape[-1])
        problem_type = getattr(getattr(base, "config", None), "problem_type", None)
        if problem_type is None:
            if num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            fn = nn.MSELoss()
            loss = fn(logits.squeeze(-1), labels.to(logits.dtype)) if num_labels == 1 \
                else fn(logits, labels.to(logits.dtype))
        elif problem_type == "single_label_classification":
            loss = nn.CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
        else:
            loss = nn.BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
        if return_outputs:
            outputs["loss"] = loss
            return loss, outputs
        return loss
