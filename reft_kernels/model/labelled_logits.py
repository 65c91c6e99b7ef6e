"""Logits only where a label is: a training step's LM head and loss at the labelled positions alone.

A causal LM's training loss (HF's ``ForCausalLMLoss``; labels ``y``, hidden states ``h`` after the
final norm, head ``W``) is

    loss = (1/N) * sum over (b, t) with y[b, t+1] != -100 of  -log softmax(W h[b, t])[y[b, t+1]]

with ``N`` the number of such (b, t) (the mean), or ``N = num_items_in_batch`` when the Trainer
passes it for gradient accumulation (then the sum is divided by it). No other row of ``W h``
enters the loss or its gradient, yet the full forward projects every position onto the vocabulary
(49,152 entries per position for SmolLM2) and takes its log-softmax. Here a forward pre-hook on the
head gathers ``h[b, t]`` at the labelled (b, t) before the projection, so the head, the log-softmax
and their backward run on ``N`` rows instead of ``B x T``. The steps after the head in the
families whose table names one (a cast, Gemma-2's soft-capping) are elementwise and see the
gathered rows. Everything else (the interventions, the prefix cache, gradient checkpointing) is the
same call. The loss is the same function of the same numbers, summed in another order (tests: loss
and gradients <= 1e-6 relative to the full path in fp32, transformers 4.45.1 and 5.x).

It is switched on by ``reft_model.labelled_logits = True``: ``ReftTrainer*`` do it for the
length of ``train()`` (``labelled_logits=False`` keeps the full forward), a plain
``transformers.Trainer`` through ``callbacks=[LabelledLogitsCallback()]``. Inside ``train()`` only
the training step calls the model in training mode with gradients on, and it reads only the loss.
Then it applies when the ReftModel is in training mode with gradients on, ``labels`` is a (B, T)
integer tensor, the base is a ``...ForCausalLM`` / ``...LMHeadModel`` whose family names its head
(:mod:`reft_kernels.families`) with the standard causal-LM loss, and the call asks for nothing
else that needs the logits (``output_hidden_states``, ``output_attentions``, ``return_dict=False``,
``shift_labels``, ``logits_to_keep``). Otherwise the full forward runs, with no message. On this
path the outputs carry ``loss`` and ``logits=None``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..families import family_of, get_submodule
from .lazy_callback import lazy_callback

__all__ = ["call_base", "labelled_head", "LabelledLogitsCallback"]

IGNORE = -100
_NEEDS_LOGITS = ("output_hidden_states", "output_attentions", "shift_labels", "logits_to_keep", "num_logits_to_keep")
_LOSS_KEYWORDS = ("labels", "num_items_in_batch")


def labelled_head(reft_model, inputs: dict) -> Optional[nn.Module]:
    """The head module when this call may compute logits at labelled positions only, else None."""
    model = reft_model.model
    labels = inputs.get("labels")
    if not (reft_model.training and torch.is_grad_enabled() and getattr(reft_model, "labelled_logits", False)):
        return None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.dtype not in (torch.int64, torch.int32):
        return None
    if any(inputs.get(k) is not None and inputs.get(k) is not False for k in _NEEDS_LOGITS):
        return None
    config = getattr(model, "config", None)
    if inputs.get("return_dict") is False or getattr(config, "return_dict", True) is False:
        return None
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) or getattr(config, "pretraining_tp", 1) > 1:
        return None
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM") or "_loss_function" in vars(model):
        return None
    family, _ = family_of(model)
    if family is None or family.head is None:
        return None
    try:
        head = get_submodule(model, family.head)
    except ValueError:
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if out is None or out is head else None


def call_base(reft_model, inputs: dict):
    """``reft_model.model(**inputs)``; in training with labels, the head at labelled rows only (module docstring)."""
    head = labelled_head(reft_model, inputs)
    if head is None:
        return reft_model.model(**inputs)
    labels = inputs["labels"]
    count = inputs.get("num_items_in_batch")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)   # targets[b, t] = labels[b, t + 1]
    keep = targets != IGNORE
    gathered = []

    def gather(module, args):
        hidden = args[0]
        if gathered or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != keep.shape:
            return None
        gathered.append(True)
        return (hidden[keep.to(hidden.device)],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        outputs = reft_model.model(**{k: v for k, v in inputs.items() if k not in _LOSS_KEYWORDS})
    finally:
        handle.remove()
    logits = outputs["logits"]
    if gathered:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets[keep]
    else:   # the head saw another shape (a model this table does not describe): the full loss
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    targets = targets.to(logits.device)
    if count is None:
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    else:
        total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
        loss = total / (count.to(total.device) if isinstance(count, torch.Tensor) else count)
    rest = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
    return type(outputs)(loss=loss, logits=None, **rest)


class _Callback:
    """Sets ``labelled_logits`` on the trained ReftModel for the length of ``train()``, then restores
    it (a ``train()`` that raised is restored by the end of the next one: Trainer has no hook there)."""

    def __init__(self):
        self.model, self.before = None, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        model = getattr(model, "module", model)
        if model is not None and hasattr(model, "interventions"):
            if model is not self.model:   # the same model: a train() that raised never ended; keep its before
                self.on_train_end(args, state, control)
                self.model, self.before = model, getattr(model, "labelled_logits", False)
            model.labelled_logits = True

    def on_train_end(self, args, state, control, **kw):
        if self.model is not None:
            self.model.labelled_logits = self.before
            self.model = None


__getattr__ = lazy_callback(globals(), "LabelledLogitsCallback", _Callback, """\
``transformers.Trainer(..., callbacks=[LabelledLogitsCallback()])`` on a ReftModel: the training
steps compute the LM head and the loss at labelled positions only (module docstring).""")
