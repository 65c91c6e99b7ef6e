"""Training steps without their padding: a batch's rows run in length groups, each group trimmed.

A collator pads every row of a batch to its longest, ``T``. Row ``b`` needs only its first

    n_b = 1 + max(last attended position, last edited position, last labelled position)

positions: with right padding, no kept position attends to a later one (masked keys; causal
queries never look ahead), no edit and no label lies after ``n_b``, so dropping the columns
``n_b..T-1`` of row ``b`` changes no number that enters the loss. The quick start's ten examples
hold 674 real tokens padded to 10 x 191 = 1,910 slots: two thirds of a padded step computes
padding.

Here the rows are sorted by ``n_b`` and cut into contiguous groups ``g`` (fewest padded slots,
each extra group charged 10% for its own call); each group runs as its own model call on
``rows(g) x max(n_b in g)``, and the loss is re-assembled exactly:

    loss = sum_g sum_{(b, t) in g, labelled} l(b, t) / N     (N = the Trainer's ``num_items_in_batch``,
                                                              else the batch's labelled count)

which is HF's loss (the mean over labelled tokens, or the sum over ``num_items_in_batch``), summed in
another order. Gradients follow from the same sum.

It applies only where the step reads nothing but the loss: the call qualifies for logits at
labelled positions (:func:`reft_kernels.model.labelled_logits.labelled_head`: training mode,
gradients on, (B, T) labels, a causal LM whose family names its head), every intervention edits
listed positions (not ``unit_locations=None``), no ``adapter_ids``, no dropout is active in the
base or the interventions (their random streams would be drawn in another order), gradient
checkpointing is off (its recomputation in the backward would see another group's edit plan), no
FSDP or ZeRO-3 wraps the model (they gather parameters around each call; DDP is fine), and every
tensor input is a (B, T) tensor. Otherwise the whole batch runs as one call, with no message.
``reft_model.trim_padding = False`` (``ReftTrainer(trim_padding=False)``) turns it off.
Tests: losses and gradients <= 1e-6 relative to the one-call path in fp32 (Llama, Gemma, GPT-2,
both trainers, the prefix cache, gradient accumulation, transformers 4.45.1 and 5.x).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .patcher import find_cache
from .prefix_cache import active_dropout

__all__ = ["row_lengths", "plan_groups", "grouped_call", "GROUP_PENALTY"]

IGNORE = -100
GROUP_PENALTY = 0.10   # each extra model call is charged as 10% more slots (its own Python and launch cost)
_PER_CALL = ("num_items_in_batch", "use_cache", "return_dict")


def row_lengths(inputs: dict, positions: List[torch.Tensor]) -> List[int]:
    """``n_b`` per row (module docstring): 1 + the last attended, edited or labelled position."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    B, T = ids.shape
    if mask is None:
        return [T] * B
    idx = torch.arange(T, device=ids.device)
    last = torch.where(mask != 0, idx, -1).amax(1)
    last = torch.maximum(last, torch.where(inputs["labels"] != IGNORE, idx, -1).amax(1))
    for p in positions:
        if p.numel():
            last = torch.maximum(last, p.amax(1).to(last.device))
    return [int(v) + 1 for v in last.tolist()]


def plan_groups(lengths: List[int], penalty: float = GROUP_PENALTY, max_groups: int = 8) -> List[List[int]]:
    """Rows cut into groups (lists of row indices) with the fewest charged slots.

    Rows sorted by length; a group of rows ``g`` costs ``|g| * max(n_b in g)`` slots and every
    group after the first ``penalty`` times the batch's padded slots ``B * T`` (exact dynamic
    programme over contiguous runs, O(B^2 * max_groups)). One group means: run the batch as is.
    """
    import numpy as np
    order = sorted(range(len(lengths)), key=lambda b: lengths[b])
    n = np.array([lengths[b] for b in order], dtype=np.float64)
    B = len(n)
    charge = penalty * B * n[-1]
    best = np.full((max_groups + 1, B + 1), np.inf)   # best[k, j]: the first j sorted rows in k groups
    cut = np.zeros((max_groups + 1, B + 1), dtype=np.int64)
    best[0, 0] = 0.0
    i = np.arange(B)
    for k in range(1, max_groups + 1):
        for j in range(1, B + 1):   # the last group is rows i..j-1 (sorted), costing (j - i) * n[j-1]
            c = best[k - 1, :j] + (j - i[:j]) * n[j - 1]
            cut[k, j] = int(np.argmin(c))
            best[k, j] = c[cut[k, j]]
    k = min(range(1, max_groups + 1), key=lambda k: best[k, B] + (k - 1) * charge)
    groups, j = [], B
    while k:
        i0 = int(cut[k, j])
        groups.append(order[i0:j])
        j, k = i0, k - 1
    return groups[::-1]


def _qualifies(reft_model, inputs: dict, positions) -> bool:
    from .labelled_logits import labelled_head
    if not getattr(reft_model, "trim_padding", True) or labelled_head(reft_model, inputs) is None:
        return False
    if not positions or any(p is None for p in positions):
        return False
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or inputs.get("inputs_embeds") is not None:
        return False
    shape = tuple(ids.shape)
    for k, v in inputs.items():
        if k not in _PER_CALL and isinstance(v, torch.Tensor) and tuple(v.shape) != shape:
            return False
    if find_cache((), inputs) is not None or _checkpointing(reft_model.model) or _sharded(reft_model):
        return False
    return active_dropout([reft_model]) is None


def _checkpointing(base) -> bool:
    """Gradient checkpointing recomputes each layer during the backward, after every group's forward,
    when the hooks hold the last group's plan: grouped calls would be edited at another group's
    positions, so checkpointed models run one call per batch."""
    # what HF's is_gradient_checkpointing / is_activation_checkpointing compute, without the
    # property (5.x warns on the old name; a PEFT wrapper forwards it)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def _sharded(module) -> bool:
    """FSDP (1 or 2) or DeepSpeed ZeRO-3 manage parameters around each module call and expect one
    forward per backward; grouped calls are not tried under them (DDP, which wraps only the outside,
    is fine)."""
    for m in module.modules():
        if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for c in type(m).__mro__):
            return True
    return any(hasattr(p, "ds_id") for p in module.parameters())


def grouped_call(reft_model, inputs: dict, positions: list, call) -> Optional[object]:
    """The outputs of one training call run in length groups, or None when it does not apply.

    ``positions``: the call's per-location (B, P) positions (-1 = none); ``call(sub_inputs,
    sub_locations)`` runs one group through the ordinary path, ``sub_locations`` being the
    (rows, n_locations, P) tensor of that group's positions.
    """
    if not _qualifies(reft_model, inputs, positions):
        return None
    ids = inputs["input_ids"]
    B, T = ids.shape
    lengths = row_lengths(inputs, positions)
    groups = plan_groups(lengths)
    if len(groups) == 1 and max(lengths) == T:
        return None
    labels = inputs["labels"]
    count = inputs.get("num_items_in_batch")
    if count is None:
        count = (labels[:, 1:] != IGNORE).sum()
        if int(count) == 0:
            return None
    width = max(p.shape[1] for p in positions)
    locations = torch.stack([F.pad(p, (0, width - p.shape[1]), value=-1) for p in positions], dim=1)
    loss, outputs = None, None
    for rows in groups:
        n = max(lengths[b] for b in rows)
        index = torch.tensor(rows, device=ids.device)
        sub = {k: (v.index_select(0, index.to(v.device))[:, :n] if isinstance(v, torch.Tensor)
                   and k not in _PER_CALL else v) for k, v in inputs.items()}
        sub["num_items_in_batch"] = count
        outputs = call(sub, locations.index_select(0, index.to(locations.device)))
        loss = outputs["loss"] if loss is None else loss + outputs["loss"]
    return type(outputs)(loss=loss, logits=None)
