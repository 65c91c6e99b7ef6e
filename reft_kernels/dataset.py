"""Data modules and dataset classes (pyreft's ``dataset.py`` API); positions live in
:mod:`reft_kernels.dataset_positions` and are re-exported here.

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

import copy
from typing import Dict, Optional

import torch

from .dataset_positions import (IGNORE_INDEX, ReftDataCollator, get_intervention_locations,
                                make_data_collator, make_generation_inputs, parse_positions,
                                shift_locations_for_left_padding)

__all__ = [
    "IGNORE_INDEX", "parse_positions", "get_intervention_locations", "ReftDataCollator",
    "make_data_collator", "make_last_position_supervised_data_module",
    "make_last_position_supervised_chat_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "shift_locations_for_left_padding",
    "no_header_prompt_template", "prompt_input", "prompt_no_input", "make_generation_inputs",
    "ReftDataset", "ReftSupervisedDataset", "ReftGenerationDataset", "ReftClassificationDataset",
]

no_header_prompt_template = """\
### Instruction:
%s

### Response:
"""

prompt_input = """Below is an instruction that \
describes a task, paired with an input that provides \
further context. Write a response that appropriately \
completes the request.

### Instruction:
%s

### Input:
%s

### Response:
"""

prompt_no_input = """Below is an instruction that \
describes a task. Write a response that appropriately \
completes the request.

### Instruction:
%s

### Response:
"""

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



# ------------------------------------------------------------------------------------------------
# pyreft's dataset classes (paper-script layout: a "sink" pad token in front)
# ------------------------------------------------------------------------------------------------
class ReftDataset(torch.utils.data.Dataset):
    """pyreft's ``ReftDataset``: tokenises ``dataset`` (or ``data_path``) eagerly; subclasses
    implement :meth:`tokenize` returning ``(dict, last_position)``.

    Layout as in pyreft (``pad_mode="first"``): one pad token is prepended (label -100), every
    position is shifted by +1 so -1 pads point at that masked "sink" token, and
    ``attention_mask = input_ids != pad_token_id``. ``position`` is the "f7+l7" string;
    ``num_interventions`` and ``share_weights`` as in :func:`get_intervention_locations`.
    Like pyreft, these classes use ``last_position = prompt_len - 1``, so after the shift "l1"
    is the second-to-last prompt token; the ``make_*`` data modules use the true last token.
    """

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train",
                 dataset=None, seed: int = 42, max_n_example: Optional[int] = None, **kwargs):
        super().__init__()
        self.tokenizer, self.task, self.data_path, self.data_split = tokenizer, task, data_path, data_split
        self.first_n, self.last_n = parse_positions(kwargs["position"])
        self.pad_mode = "first"
        self.preprocess(kwargs)
        data = dataset if dataset is not None else self.load_dataset()
        if max_n_example is not None:
            data = data.shuffle(seed=seed).select(range(max_n_example))
        self.raw_dataset = data if data_split != "train" else None
        self.result = [self._finish(i, *self.tokenize(item), kwargs) for i, item in enumerate(data)]

    def load_dataset(self):
        import datasets
        if self.data_path is not None and self.data_path.endswith((".json", ".jsonl")):
            return datasets.load_dataset("json", data_files=self.data_path, split="train")
        return datasets.load_dataset(self.task, self.data_path, split=self.data_split)

    def preprocess(self, kwargs):
        """Read field names from ``kwargs``; override."""

    def tokenize(self, data_item):
        raise NotImplementedError

    def _ids(self, text: str) -> torch.Tensor:
        max_len = _max_length(self.tokenizer)
        kw = dict(max_length=max_len, truncation=True) if max_len else {}
        return torch.tensor(self.tokenizer(text, **kw)["input_ids"], dtype=torch.long)

    def _finish(self, i, result, last_position, kwargs):
        locs = get_intervention_locations(last_position=last_position, first_n=self.first_n, last_n=self.last_n,
                                          pad_mode=self.pad_mode, num_interventions=kwargs["num_interventions"],
                                          share_weights=kwargs.get("share_weights", False))
        pad = self.tokenizer.pad_token_id
        result["input_ids"] = torch.cat((torch.tensor([pad]), result["input_ids"]))
        if "labels" in result:
            result["labels"] = torch.cat((torch.tensor([IGNORE_INDEX]), result["labels"]))
        result["intervention_locations"] = (torch.tensor(locs) + 1).tolist()
        result["attention_mask"] = (result["input_ids"] != pad).long()
        result["id"] = i
        return result

    def __len__(self):
        return len(self.result)

    def __getitem__(self, i):
        return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in self.result[i].items()}


class ReftSupervisedDataset(ReftDataset):
    """Alpaca-style (``instruction_field``, ``input_field``, ``output_field``); pyreft's templates."""

    def __init__(self, *args, no_stop: bool = False, **kwargs):
        self.no_stop = no_stop
        super().__init__(*args, **kwargs)

    def preprocess(self, kwargs):
        self.input_field, self.output_field = kwargs["input_field"], kwargs["output_field"]
        self.instruction_field = kwargs["instruction_field"]

    def tokenize(self, item):
        if not item.get(self.input_field):
            prompt = prompt_no_input % item[self.instruction_field]
        else:
            prompt = prompt_input % (item[self.instruction_field], item[self.input_field])
        prompt_len = len(self._ids(prompt))
        full = prompt + item[self.output_field] + ("" if self.no_stop else self.tokenizer.eos_token)
        ids = self._ids(full)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}, prompt_len - 1


class ReftGenerationDataset(ReftDataset):
    """``prompt_field`` + ``completion_field``; intervenes on the prompt only."""

    def preprocess(self, kwargs):
        self.prompt_field, self.completion_field = kwargs["prompt_field"], kwargs["completion_field"]

    def tokenize(self, item):
        prompt_len = len(self._ids(item[self.prompt_field]))
        ids = self._ids(item[self.prompt_field] + item[self.completion_field] + self.tokenizer.eos_token)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}, prompt_len - 1


class ReftClassificationDataset(ReftDataset):
    """One text field (``input_field``); ``label_field`` tokenised (or the input itself)."""

    def preprocess(self, kwargs):
        self.input_field, self.label_field = kwargs["input_field"], kwargs["label_field"]

    def tokenize(self, item):
        ids = self._ids(item[self.input_field])
        out = {"input_ids": ids}
        if self.label_field == self.input_field:
            out["labels"] = ids.clone()
        elif self.label_field is not None:
            out["labels"] = self._ids(item[self.label_field])
        return out, len(ids) - 1
