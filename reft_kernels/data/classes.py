"""pyreft 0.1.0's dataset classes, item for item (re-exported by :mod:`reft_kernels.data.datasets`).

These build the "paper-script" layout, unlike the ``make_*`` data modules:

* ``pad_mode="first"`` (default): one pad token is prepended to every field in
  ``fields_to_pad`` (``labels`` gets -100 instead), every position is shifted by +1, so pyreft's
  -1 padding slots point at that masked "sink" token at index 0;
* ``pad_mode="last"`` (pyreft's GLUE datasets set it in ``preprocess``): one pad token is
  appended instead and padding slots point at it (index L); positions are not shifted;
* the mask is ``field != pad_token_id`` (int32): ``attention_mask`` when ``fields_to_mask`` has
  one field, else ``<field>_mask`` per field (the reward dataset's chosen/rejected pair).

The construction order is pyreft's, so subclasses written for pyreft work unchanged:
``preprocess(kwargs)`` -> ``load_dataset()`` (sets ``raw_dataset``; the result is
``task_dataset``) -> ``postprocess(kwargs)`` (may edit ``task_dataset``, e.g. hold out a
validation split, or set ``num_labels``) -> per item ``tokenize(item)`` returning
``(dict, last_position)`` and ``compute_intervention_and_subspaces``.

As in pyreft, ReftSupervised/Generation/ClassificationDataset use ``last_position =
prompt_len - 1`` (after the shift "l1" is the second-to-last prompt token); ReftRawDataset and
ReftPreferenceDataset use ``prompt_len``.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch

from .positions import IGNORE_INDEX, get_intervention_locations, parse_positions
from .templates import prompt_input, prompt_no_input

__all__ = ["ReftDataset", "ReftRawDataset", "ReftClassificationDataset", "ReftGenerationDataset",
           "ReftSupervisedDataset", "tokenize_ids"]


def tokenize_ids(tokenizer, text: str) -> torch.Tensor:
    """``text`` -> 1-D LongTensor of ids, truncated to ``model_max_length`` (pyreft's call)."""
    return tokenizer(text, max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")["input_ids"][0]


def _load(task, data_path, data_split):
    """pyreft's loading rule: ``task`` from the Hub, a ``.json``/``.jsonl`` file, or ``(task, data_path)``."""
    from datasets import load_dataset
    if data_path is None:
        return load_dataset(task, split=data_split)
    if data_path.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=data_path, split="train")
    return load_dataset(task, data_path, split=data_split)


class ReftDataset(torch.utils.data.Dataset):
    """pyreft's ``ReftDataset(task, data_path, tokenizer, data_split="train", dataset=None,
    seed=42, max_n_example=None, **kwargs)``; ``kwargs`` needs ``position`` ("f7+l7") and
    ``num_interventions`` (and may have ``share_weights``); subclasses read their fields from it
    in :meth:`preprocess`. See the module docstring for the layout and the hook order.
    """

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train",
                 dataset=None, seed: int = 42, max_n_example: Optional[int] = None, **kwargs):
        super().__init__()
        if "position" not in kwargs or "num_interventions" not in kwargs:
            raise TypeError(f"{type(self).__name__} needs the keyword arguments position= (e.g. 'f7+l7') "
                            "and num_interventions= (one per listed representation)")
        self.tokenizer = tokenizer
        self.first_n, self.last_n = parse_positions(kwargs["position"])
        self.task, self.data_path, self.data_split = task, data_path, data_split
        self.dataset, self.seed, self.max_n_example = dataset, seed, max_n_example
        self.pad_mode = "first"
        self.fields_to_pad = ["input_ids", "labels"]
        self.fields_to_mask = ["input_ids"]
        self.preprocess(kwargs)
        self.task_dataset = self.load_dataset()
        self.postprocess(kwargs)
        self.result = []
        for i, item in enumerate(self.task_dataset):
            tokenized, last_position = self.tokenize(item)
            self.result.append(self.compute_intervention_and_subspaces(i, item, tokenized, last_position,
                                                                       **kwargs))

    # -- hooks (override) ----------------------------------------------------------------------
    def tokenize(self, data_item, **kwargs):
        """Return ``(dict of 1-D tensors, last_position)`` for one raw item."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenize(data_item)")

    def preprocess(self, kwargs):
        """Runs before loading: read field names from ``kwargs``, set ``pad_mode`` etc."""

    def postprocess(self, kwargs):
        """Runs after loading: may replace ``self.task_dataset`` or set attributes."""

    def get_intervention_locations(self, **kwargs):
        return get_intervention_locations(**kwargs)

    # -- machinery -----------------------------------------------------------------------------
    def __len__(self):
        return len(self.result)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        return copy.deepcopy(self.result[i])

    def load_dataset(self):
        """``dataset`` if given, else loaded (see ``_load``); shuffled with ``seed`` and cut to
        ``max_n_example`` when set. Sets ``raw_dataset`` (None for the train split)."""
        data = self.dataset if self.dataset is not None else _load(self.task, self.data_path, self.data_split)
        if self.max_n_example is not None:
            data = data.shuffle(seed=self.seed).select(range(self.max_n_example))
        self.raw_dataset = data if self.data_split != "train" else None
        return data

    def _pad_field(self, name, values):
        fill = IGNORE_INDEX if name == "labels" else self.tokenizer.pad_token_id
        pad = torch.tensor([fill], dtype=values.dtype)
        return torch.cat((pad, values)) if self.pad_mode == "first" else torch.cat((values, pad))

    def compute_intervention_and_subspaces(self, id: int, data_item, result: dict, last_position: int,
                                           **kwargs):
        if self.pad_mode not in ("first", "last"):
            raise ValueError(f"pad_mode={self.pad_mode!r}; use 'first' (sink token in front) or 'last'")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("first_n", "last_n", "pad_mode")}
        locs = self.get_intervention_locations(last_position=last_position, first_n=self.first_n,
                                               last_n=self.last_n, pad_mode=self.pad_mode, **kwargs)
        result["intervention_locations"] = locs
        result["id"] = id
        for name in self.fields_to_pad:
            if name in result:
                result[name] = self._pad_field(name, result[name])
        if self.pad_mode == "first":
            result["intervention_locations"] = (torch.IntTensor(locs) + 1).tolist()
        pad_id = self.tokenizer.pad_token_id
        if len(self.fields_to_mask) == 1:
            result["attention_mask"] = (result[self.fields_to_mask[0]] != pad_id).int()
        else:
            for name in self.fields_to_mask:
                result[f"{name}_mask"] = (result[name] != pad_id).int()
        if "subspaces" in data_item:   # one constant subspace list per task, as pyreft
            n = kwargs["num_interventions"]
            if kwargs.get("share_weights", False):
                n = n // 2
            result["subspaces"] = [data_item["subspaces"]] * n
        return result


class ReftRawDataset(torch.utils.data.Dataset):
    """pyreft's ``ReftRawDataset``: ``instruction`` + ``output`` fields, no template.

    Positions from the true prompt length (``last_position = prompt_len``), sink token in front
    (+1 shift). Non-train splits hold the prompt only (no labels), for generation.
    """

    def __init__(self, task: str, data_path: str, tokenizer, data_split: str = "train", dataset=None,
                 seed: int = 42, max_n_example: Optional[int] = None, **kwargs):
        super().__init__()
        if dataset is None:
            from datasets import load_dataset
            dataset = (load_dataset("json", data_files=data_path) if data_path.endswith(".json")
                       else load_dataset(data_path))[data_split]
        if max_n_example is not None:
            dataset = dataset.shuffle(seed=seed).select(range(max_n_example))
        self.raw_dataset = dataset if data_split != "train" else None
        first_n, last_n = parse_positions(kwargs["position"])
        kwargs = {k: v for k, v in kwargs.items() if k not in ("position", "first_n", "last_n", "pad_mode")}
        cols = {"input_ids": [], "attention_mask": [], "intervention_locations": [], "labels": [],
                "subspaces": [], "id": []}
        pad = torch.tensor([tokenizer.pad_token_id])
        for i, item in enumerate(dataset):
            prompt = item["instruction"]
            prompt_len = len(tokenize_ids(tokenizer, prompt))
            if data_split == "train":
                ids = tokenize_ids(tokenizer, prompt + item["output"] + tokenizer.eos_token)
                labels = ids.clone()
                labels[:prompt_len] = IGNORE_INDEX
                cols["labels"].append(torch.cat((torch.tensor([IGNORE_INDEX]), labels)))
            else:
                ids = tokenize_ids(tokenizer, prompt)
            ids = torch.cat((pad, ids))
            locs = self.get_intervention_locations(last_position=prompt_len, first_n=first_n, last_n=last_n,
                                                   pad_mode="first", **kwargs)
            cols["input_ids"].append(ids)
            cols["intervention_locations"].append((torch.IntTensor(locs) + 1).tolist())
            cols["id"].append(i)
            cols["attention_mask"].append((ids != tokenizer.pad_token_id).int())
            if "subspaces" in item:
                n = kwargs["num_interventions"] // (2 if kwargs.get("share_weights", False) else 1)
                cols["subspaces"].append([item["subspaces"]] * n)
        self.input_ids, self.attention_mask = cols["input_ids"], cols["attention_mask"]
        self.intervention_locations, self.id = cols["intervention_locations"], cols["id"]
        self.labels = cols["labels"] or None
        self.subspaces = cols["subspaces"] or None

    def get_intervention_locations(self, **kwargs):
        return get_intervention_locations(**kwargs)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        out = dict(input_ids=self.input_ids[i], attention_mask=self.attention_mask[i],
                   intervention_locations=self.intervention_locations[i], id=self.id[i])
        if self.labels is not None:
            out["labels"] = self.labels[i]
        if self.subspaces is not None:
            out["subspaces"] = self.subspaces[i]
        return out


def _labels_after(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:prompt_len] = IGNORE_INDEX
    return labels


class ReftClassificationDataset(ReftDataset):
    """One text field (``input_field``); ``label_field`` tokenised (or the input itself)."""

    def preprocess(self, kwargs):
        self.input_field, self.label_field = kwargs["input_field"], kwargs["label_field"]

    def tokenize(self, data_item):
        ids = tokenize_ids(self.tokenizer, data_item[self.input_field])
        result = {"input_ids": ids}
        if self.label_field == self.input_field:
            result["labels"] = ids.clone()
        elif self.label_field is not None:
            result["labels"] = tokenize_ids(self.tokenizer, data_item[self.label_field])
        return result, len(ids) - 1


class ReftGenerationDataset(ReftDataset):
    """``prompt_field`` + ``completion_field`` (+ eos); intervenes on the prompt only."""

    def preprocess(self, kwargs):
        self.prompt_field, self.completion_field = kwargs["prompt_field"], kwargs["completion_field"]

    def tokenize(self, data_item):
        prompt = data_item[self.prompt_field]
        prompt_len = len(tokenize_ids(self.tokenizer, prompt))
        ids = tokenize_ids(self.tokenizer, prompt + data_item[self.completion_field] + self.tokenizer.eos_token)
        return {"input_ids": ids, "labels": _labels_after(ids, prompt_len)}, prompt_len - 1


def alpaca_prompt(item, instruction_field, input_field) -> str:
    """pyreft's Alpaca template, with or without the input section."""
    if input_field not in item or item[input_field] == "":
        return prompt_no_input % item[instruction_field]
    return prompt_input % (item[instruction_field], item[input_field])


class ReftSupervisedDataset(ReftDataset):
    """Alpaca-style (``instruction_field``, ``input_field``, ``output_field``); pyreft's templates;
    ``no_stop=True`` leaves out the eos token."""

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train",
                 dataset=None, seed: int = 42, max_n_example: Optional[int] = None, no_stop: bool = False,
                 **kwargs):
        self.no_stop = no_stop
        super().__init__(task=task, data_path=data_path, tokenizer=tokenizer, data_split=data_split,
                         dataset=dataset, seed=seed, max_n_example=max_n_example, **kwargs)

    def preprocess(self, kwargs):
        self.input_field, self.output_field = kwargs["input_field"], kwargs["output_field"]
        self.instruction_field = kwargs["instruction_field"]

    def tokenize(self, data_item):
        prompt = alpaca_prompt(data_item, self.instruction_field, self.input_field)
        prompt_len = len(tokenize_ids(self.tokenizer, prompt))
        full = prompt + data_item[self.output_field] + ("" if self.no_stop else self.tokenizer.eos_token)
        ids = tokenize_ids(self.tokenizer, full)
        return {"input_ids": ids, "labels": _labels_after(ids, prompt_len)}, prompt_len - 1
