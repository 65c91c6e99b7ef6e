"""Intervention positions in examples and batches (pyreft's positions API and the collator).

* :func:`parse_positions` reads pyreft's ``"f7+l7"`` strings; :func:`get_intervention_locations`
  turns one prompt length into per-intervention position lists (pyreft semantics).
* :class:`ReftDataCollator` pads per-example lists into a LongTensor ``[B, num_interventions, P]``
  (``-1`` = "no edit"), shifted by each row's pad count when the tokenizer pads on the left;
  :func:`make_generation_inputs` builds the same for a left-padded prompt batch (:func:`left_pad`,
  :func:`prompt_locations`: what the server's batches are built from too).

An example's positions are **relative to its own unpadded tokens**. Unlike pyreft there is no
extra "sink" pad token, so real tokens keep their position ids and ``pad_token_id`` may appear
inside the text; left padding is supported (pyreft's positions are silently wrong with it).
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "parse_positions", "get_intervention_locations",
           "shift_locations_for_left_padding", "pad_locations", "ReftDataCollator", "make_data_collator",
           "left_pad", "prompt_locations", "make_generation_inputs"]

_POSITIONS_RE = re.compile(r"^\s*(?:f(\d+))?\s*(?:\+)?\s*(?:l(\d+))?\s*$")


# ------------------------------------------------------------------------------------------------
# positions
# ------------------------------------------------------------------------------------------------
def parse_positions(positions: str):
    """``"f7+l7" -> (7, 7)``, ``"f3" -> (3, 0)``, ``"l1" -> (0, 1)`` (pyreft's format)."""
    if not isinstance(positions, str):
        raise TypeError(f"positions={positions!r} must be a string such as 'f7+l7', 'f1' or 'l1'")
    m = _POSITIONS_RE.match(positions)
    if m is None or (m.group(1) is None and m.group(2) is None) or \
            ("+" in positions and (m.group(1) is None or m.group(2) is None)):
        raise ValueError(f"positions={positions!r} is not valid; use 'fN', 'lM' or 'fN+lM' "
                         "(first N and/or last M prompt tokens), e.g. 'f7+l7'")
    first_n, last_n = int(m.group(1) or 0), int(m.group(2) or 0)
    _check_selects_something(first_n, last_n, f"positions={positions!r}")
    return first_n, last_n


def _check_selects_something(first_n: int, last_n: int, what: str) -> None:
    """pyreft accepts "f0+l0" and trains an adapter that edits no token (grad norm 0): refuse it."""
    if first_n == 0 and last_n == 0:
        raise ValueError(f"{what}: selects no token (first 0 and last 0 prompt tokens), so the "
                         "interventions would never edit anything; pass at least one position, "
                         "e.g. 'l1' (the last prompt token), 'f1+l1' or 'f7+l7'")


def get_intervention_locations(**kwargs) -> List[List[int]]:
    """Positions per intervention for one prompt of length ``last_position`` (pyreft semantics).

    Keyword arguments (as pyreft): ``last_position`` (the prompt length L), either ``positions``
    ("f7+l7") or ``first_n``/``last_n``, ``num_interventions``, ``share_weights=False``,
    ``pad_mode="first"`` (pad with -1) or ``"last"`` (pad with L, pyreft's GLUE convention).

    ``first_n``/``last_n`` are clamped to ``L // 2`` so the two groups never overlap; the clamped
    amount is padded. Tied (``share_weights`` or only one of f/l): every intervention gets
    ``[0..f-1] + [L-l..L-1] + pads``. Untied: the first ``n // 2`` interventions get the first
    positions and the last ``n // 2`` the last positions, both padded to one length.
    """
    share_weights = kwargs.get("share_weights", False)
    last_position = kwargs["last_position"]
    if "positions" in kwargs and kwargs["positions"] is not None:
        _first_n, _last_n = parse_positions(kwargs["positions"])
    else:
        _first_n, _last_n = kwargs["first_n"], kwargs["last_n"]
        for name, value in (("first_n", _first_n), ("last_n", _last_n)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int (a number of tokens)")
        _check_selects_something(_first_n, _last_n, f"first_n={_first_n} and last_n={_last_n}")
    num_interventions = kwargs["num_interventions"]
    pad_mode = kwargs.get("pad_mode", "first")
    if pad_mode not in ("first", "last"):
        raise ValueError(f"pad_mode={pad_mode!r}; use 'first' (pad with -1) or 'last' (pad with L)")
    if not isinstance(last_position, int) or last_position < 0:
        raise ValueError(f"last_position={last_position!r} must be a non-negative int (the prompt length)")
    if not isinstance(num_interventions, int) or num_interventions < 1:
        raise ValueError(f"num_interventions={num_interventions!r} must be a positive int")

    first_n = min(last_position // 2, _first_n)
    last_n = min(last_position // 2, _last_n)
    pad_amount = (_first_n - first_n) + (_last_n - last_n)
    pad_position = -1 if pad_mode == "first" else last_position
    if share_weights or first_n == 0 or last_n == 0:
        position_list = list(range(first_n)) + list(range(last_position - last_n, last_position)) \
            + [pad_position] * pad_amount
        return [list(position_list) for _ in range(num_interventions)]
    if num_interventions % 2:
        raise ValueError(
            f"num_interventions={num_interventions} is odd, but untied 'f+l' positions need one "
            "intervention for the first and one for the last positions per layer; use an even "
            "number (layers listed twice) or share_weights=True")
    left = list(range(first_n)) + [pad_position] * (_first_n - first_n)
    right = list(range(last_position - last_n, last_position)) + [pad_position] * (_last_n - last_n)
    width = max(len(left), len(right))
    left += [pad_position] * (width - len(left))
    right += [pad_position] * (width - len(right))
    half = num_interventions // 2
    return [list(left) for _ in range(half)] + [list(right) for _ in range(half)]


def shift_locations_for_left_padding(locations: torch.Tensor, pad_counts: torch.Tensor) -> torch.Tensor:
    """Add each row's left-pad count to its non-negative positions; ``-1`` stays ``-1``.

    ``locations``: [B, n, P]; ``pad_counts``: [B].
    """
    shift = pad_counts.to(locations.dtype).view(-1, *([1] * (locations.dim() - 1)))
    return torch.where(locations >= 0, locations + shift, locations)


def pad_locations(rows: Sequence[Any]) -> torch.Tensor:
    """Per-example ``[n, P_i]`` lists/tensors -> LongTensor ``[B, n, max P]`` padded with -1."""
    mats = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    mats = [m.view(1, -1) if m.dim() == 1 else m for m in mats]
    n = {m.shape[0] for m in mats}
    if len(n) != 1:
        raise ValueError(f"examples in one batch have different numbers of interventions {sorted(n)}; "
                         "every example needs one location list per intervention")
    width = max(m.shape[1] for m in mats)
    out = torch.full((len(mats), n.pop(), width), -1, dtype=torch.long)
    for i, m in enumerate(mats):
        out[i, :, : m.shape[1]] = m
    return out


# ------------------------------------------------------------------------------------------------
# collator
# ------------------------------------------------------------------------------------------------
@dataclass
class ReftDataCollator:
    """Wrap a padding collator (e.g. ``DataCollatorForSeq2Seq``) and add ``intervention_locations``.

    The wrapped collator pads ``input_ids``/``labels``; this class pads the location lists with
    ``-1`` into a LongTensor ``[B, n, P]`` and, when the tokenizer pads on the left, shifts each
    row's positions by its pad count, so the same dataset works with either padding side.
    """

    data_collator: Any

    def _padding_side(self) -> str:
        tok = getattr(self.data_collator, "tokenizer", None)
        return getattr(tok, "padding_side", "right") if tok is not None else "right"

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        instances = [dict(x) for x in instances]
        locs = [x.pop("intervention_locations") for x in instances] \
            if all("intervention_locations" in x for x in instances) else None
        lengths = torch.tensor([len(x["input_ids"]) for x in instances])
        batch = self.data_collator(instances)
        seq_len = batch["input_ids"].shape[-1]
        if "attention_mask" not in batch:
            ar = torch.arange(seq_len)
            if self._padding_side() == "left":
                batch["attention_mask"] = (ar[None] >= (seq_len - lengths)[:, None]).long()
            else:
                batch["attention_mask"] = (ar[None] < lengths[:, None]).long()
        if locs is not None:
            loc = pad_locations(locs)
            if self._padding_side() == "left":
                loc = shift_locations_for_left_padding(loc, seq_len - lengths)
            if loc.numel() and int(loc.max()) >= seq_len:
                raise ValueError(f"an intervention position ({int(loc.max())}) is past the padded batch "
                                 f"length {seq_len}; positions must index the example's own tokens")
            batch["intervention_locations"] = loc
        return batch


def make_data_collator(tokenizer, model=None, max_length: Optional[int] = None) -> ReftDataCollator:
    """``ReftDataCollator`` around ``DataCollatorForSeq2Seq`` (labels padded with -100)."""
    from transformers import DataCollatorForSeq2Seq
    return ReftDataCollator(data_collator=DataCollatorForSeq2Seq(
        tokenizer=tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding="longest",
        max_length=max_length))


def left_pad(id_lists: Sequence[Sequence[int]], pad_id: int):
    """A left-padded batch of token-id lists: ``(input_ids [B, W], attention_mask [B, W], pads)``,
    ``pads[b] = W - len(id_lists[b])`` (the shift of row ``b``'s positions)."""
    width = max(len(x) for x in id_lists)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in id_lists])
    lengths = torch.tensor([len(x) for x in id_lists])
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()
    return input_ids, mask, [width - len(x) for x in id_lists]


def prompt_locations(prompt_len: int, positions: str, num_interventions: int, share_weights: bool,
                     pad: int = 0, num_slots: Optional[int] = None) -> List[List[int]]:
    """The edited token indices of a prompt of ``prompt_len`` tokens left-padded by ``pad``:
    one list per intervention (-1 = no edit), ``num_slots`` lists in all (extra ones all -1)."""
    locs = get_intervention_locations(last_position=prompt_len, positions=positions,
                                      num_interventions=num_interventions, share_weights=share_weights)
    locs = [[p + pad if p >= 0 else -1 for p in row] for row in locs]
    width = max((len(r) for r in locs), default=0)
    return locs + [[-1] * width] * ((num_slots or num_interventions) - num_interventions)


def make_generation_inputs(tokenizer, prompts, positions: str = "l1", num_interventions: int = 1,
                           share_weights: bool = False, device=None) -> Dict[str, torch.Tensor]:
    """Left-padded prompt batch for ``ReftModel.generate``: input_ids, attention_mask and
    intervention_locations [B, n, P] (positions as in training, shifted by each row's padding).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    parse_positions(positions)
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a prompt encodes to no tokens; pass non-empty prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")
    input_ids, mask, pads = left_pad(ids, pad)
    locs = pad_locations([prompt_locations(len(x), positions, num_interventions, share_weights, pad=p)
                          for x, p in zip(ids, pads)])
    out = {"input_ids": input_ids, "attention_mask": mask, "intervention_locations": locs}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
