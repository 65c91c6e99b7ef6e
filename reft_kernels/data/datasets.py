"""Data modules (pyreft's ``dataset.py`` API). Re-exported here: positions and the collator
(:mod:`reft_kernels.data.positions`), pyreft's dataset classes
(:mod:`reft_kernels.data.classes`, :mod:`reft_kernels.data.preference`) and prompt
templates (:mod:`reft_kernels.data.templates`).

Every data module returns ``dict(train_dataset=datasets.Dataset, eval_dataset=None,
data_collator=ReftDataCollator)``. Each example stores ``intervention_locations`` as a list of
``num_interventions`` lists of positions **relative to its own unpadded tokens**; the collator pads
the batch and returns ``intervention_locations`` as a LongTensor ``[B, num_interventions, P]``,
shifted by each row's pad count when the tokenizer pads on the left. Unused slots hold ``-1``
("no edit"); unlike pyreft there is no extra "sink" pad token, so real tokens keep their
position ids and ``pad_token_id`` may appear inside the text.

Differences from pyreft, all deliberate:
  * ``make_multiple_position_supervised_data_module`` pads with ``-1`` instead of pointing the
    padding slots at the first response token (pyreft's ``pad_mode="last"`` bug);
  * left padding is supported (pyreft's positions are silently wrong with it);
  * an odd ``num_interventions`` with untied ``f+l`` positions is an error instead of silently
    producing ``num_interventions - 1`` location lists;
  * positions that select no token (``"f0+l0"``, ``first_n=last_n=0``) are an error instead of
    training an adapter that never touches the model.
"""
from __future__ import annotations

from typing import Dict, Optional


from .classes import (ReftClassificationDataset, ReftDataset, ReftGenerationDataset,
                              ReftRawDataset, ReftSupervisedDataset)
from .positions import (IGNORE_INDEX, ReftDataCollator, get_intervention_locations, left_pad,
                        make_data_collator, make_generation_inputs, pad_locations, parse_positions,
                        prompt_locations, shift_locations_for_left_padding)
from .preference import ReftPreferenceDataset, ReftRewardCollator, ReftRewardDataset
from .templates import no_header_prompt_template, prompt_input, prompt_no_input

__all__ = [
    "IGNORE_INDEX", "parse_positions", "get_intervention_locations", "ReftDataCollator",
    "make_data_collator", "make_last_position_supervised_data_module",
    "make_last_position_supervised_chat_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "shift_locations_for_left_padding",
    "no_header_prompt_template", "prompt_input", "prompt_no_input", "make_generation_inputs",
    "left_pad", "pad_locations", "prompt_locations",
    "ReftDataset", "ReftSupervisedDataset", "ReftGenerationDataset", "ReftClassificationDataset",
    "ReftRawDataset", "ReftPreferenceDataset", "ReftRewardDataset", "ReftRewardCollator",
]

# ------------------------------------------------------------------------------------------------
# data modules
# ------------------------------------------------------------------------------------------------
def _check_pairs(inputs, outputs):
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise TypeError("inputs and outputs must be lists of strings, not single strings")
    if len(inputs) != len(outputs):
        raise ValueError(f"inputs has {len(inputs)} items but outputs has {len(outputs)}; "
                         "pass one output per input")
    if len(inputs) == 0:
        raise ValueError("inputs is empty; pass at least one (input, output) pair")


def _max_length(tokenizer) -> Optional[int]:
    m = getattr(tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and m < 10**9 else None


def _tokenize_pair(tokenizer, prompt: str, output: str, nonstop: bool):
    """(input_ids, labels, prompt_length) for prompt + output (+ eos), labels -100 on the prompt."""
    full = prompt + output
    if not nonstop:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token or pass nonstop=True")
        full += tokenizer.eos_token
    max_len = _max_length(tokenizer)
    kw = dict(max_length=max_len, truncation=True) if max_len else {}
    prompt_ids = tokenizer(prompt, **kw)["input_ids"]
    input_ids = tokenizer(full, **kw)["input_ids"]
    labels = list(input_ids)
    n = min(len(prompt_ids), len(labels))
    labels[:n] = [IGNORE_INDEX] * n
    return list(input_ids), labels, len(prompt_ids)


def _build(tokenizer, model, rows: Dict[str, list]):
    import datasets
    return dict(train_dataset=datasets.Dataset.from_dict(rows), eval_dataset=None,
                data_collator=make_data_collator(tokenizer, model))


def make_last_position_supervised_data_module(tokenizer, model, inputs, outputs,
                                              num_interventions: int = 1, nonstop: bool = False) -> Dict:
    """Intervene on the last prompt token (pyreft's README path; ``prompt_len - 1``)."""
    _check_pairs(inputs, outputs)
    rows = {"input_ids": [], "intervention_locations": [], "labels": []}
    for prompt, output in zip(inputs, outputs):
        ids, labels, plen = _tokenize_pair(tokenizer, prompt, output, nonstop)
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["intervention_locations"].append([[plen - 1]] * num_interventions)
    return _build(tokenizer, model, rows)


make_last_position_supervised_chat_data_module = make_last_position_supervised_data_module


def make_multiple_position_supervised_data_module(tokenizer, model, inputs, outputs,
                                                  positions: str = "f1+l1", num_interventions: int = 1,
                                                  nonstop: bool = False, share_weights: bool = False) -> Dict:
    """Intervene on the first/last prompt tokens given by ``positions`` ("f7+l7").

    With untied ``f+l`` (``share_weights=False``) ``num_interventions`` counts both groups: list
    each layer twice in the ReftConfig (first-position interventions, then last-position ones).
    """
    _check_pairs(inputs, outputs)
    first_n, last_n = parse_positions(positions)
    rows = {"input_ids": [], "intervention_locations": [], "labels": []}
    for prompt, output in zip(inputs, outputs):
        ids, labels, plen = _tokenize_pair(tokenizer, prompt, output, nonstop)
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["intervention_locations"].append(get_intervention_locations(
            last_position=plen, first_n=first_n, last_n=last_n, pad_mode="first",
            num_interventions=num_interventions, share_weights=share_weights))
    return _build(tokenizer, model, rows)


def make_classification_data_module(tokenizer, model, texts, labels, positions: str = "f1+l1",
                                    num_interventions: int = 1, share_weights: bool = False,
                                    text_pairs=None, eval_texts=None, eval_labels=None,
                                    eval_text_pairs=None) -> Dict:
    """GLUE-style sequence classification (e.g. RoBERTa): text (or text pair) -> label.

    Positions are taken over the whole encoded sequence (special tokens included), as in
    pyreft's GLUE scripts. Labels are ints (classification) or floats (regression).
    """
    import datasets
    from transformers import DataCollatorWithPadding

    def encode(xs, ys, pairs):
        _check_pairs(xs, ys)
        if pairs is not None and len(pairs) != len(xs):
            raise ValueError(f"text_pairs has {len(pairs)} items but texts has {len(xs)}")
        first_n, last_n = parse_positions(positions)
        max_len = _max_length(tokenizer)
        kw = dict(max_length=max_len, truncation=True) if max_len else {}
        rows = {"input_ids": [], "intervention_locations": [], "labels": []}
        for i, (x, y) in enumerate(zip(xs, ys)):
            enc = tokenizer(x, pairs[i], **kw) if pairs is not None else tokenizer(x, **kw)
            rows["input_ids"].append(list(enc["input_ids"]))
            rows["labels"].append(y)
            rows["intervention_locations"].append(get_intervention_locations(
                last_position=len(enc["input_ids"]), first_n=first_n, last_n=last_n,
                num_interventions=num_interventions, share_weights=share_weights))
        return datasets.Dataset.from_dict(rows)

    train = encode(texts, labels, text_pairs)
    evald = encode(eval_texts, eval_labels, eval_text_pairs) if eval_texts is not None else None
    return dict(train_dataset=train, eval_dataset=evald,
                data_collator=ReftDataCollator(DataCollatorWithPadding(tokenizer=tokenizer, padding="longest")))
