"""pyreft 0.1.0's preference and reward data: ``ReftPreferenceDataset``, ``ReftRewardDataset``,
``ReftRewardCollator`` (re-exported by :mod:`reft_kernels.data.datasets`).

* ``ReftPreferenceDataset``: ``(x, y_rejected, y_chosen)`` -> train the intervention to turn the
  rejected continuation into the chosen one: ``input_ids`` = prompt + rejected + eos,
  ``labels`` = prompt + chosen + eos with -100 over the prompt, both padded to one length
  (inputs with ``pad_token_id``, labels with -100). Positions from the true prompt length.
* ``ReftRewardDataset``: two chat conversations (``conv_A_field``, ``conv_B_field``; or a
  ``prompt_field`` plus two replies), chat-templated without the bos text; the edited positions
  are taken over their shared prefix (``last_position`` = common length, counting the first
  differing token, minus 1). With reward fields the better one becomes ``chosen_output``.
  Both outputs get the sink token and their own ``<field>_mask``.
* ``ReftRewardCollator``: flattens each pair into two rows (chosen, then rejected) with a
  ``reward`` (1.0 / 0.0 when the data has none) and pads them with ``tokenizer.pad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from .classes import ReftDataset, alpaca_prompt, tokenize_ids
from .positions import IGNORE_INDEX

__all__ = ["ReftPreferenceDataset", "ReftRewardDataset", "ReftRewardCollator"]


class ReftPreferenceDataset(ReftDataset):
    """Fields (kwargs): ``instruction_field``, ``input_field``, ``chosen_output_field``,
    ``rejected_output_field``. Non-train splits hold the prompt only."""

    def preprocess(self, kwargs):
        self.input_field, self.instruction_field = kwargs["input_field"], kwargs["instruction_field"]
        self.chosen_output_field = kwargs["chosen_output_field"]
        self.rejected_output_field = kwargs["rejected_output_field"]

    def tokenize(self, data_item):
        prompt = alpaca_prompt(data_item, self.instruction_field, self.input_field)
        eos = self.tokenizer.eos_token
        prompt_ids = tokenize_ids(self.tokenizer, prompt)
        if self.data_split != "train":
            return {"input_ids": prompt_ids}, len(prompt_ids)
        ids = tokenize_ids(self.tokenizer, prompt + data_item[self.rejected_output_field] + eos)
        labels = tokenize_ids(self.tokenizer, prompt + data_item[self.chosen_output_field] + eos)
        labels[:len(prompt_ids)] = IGNORE_INDEX
        width = max(ids.size(0), labels.size(0))
        ids = torch.cat((ids, torch.full((width - ids.size(0),), self.tokenizer.pad_token_id, dtype=torch.long)))
        labels = torch.cat((labels, torch.full((width - labels.size(0),), IGNORE_INDEX, dtype=torch.long)))
        return {"input_ids": ids, "labels": labels}, len(prompt_ids)


class ReftRewardDataset(ReftDataset):
    """Fields (kwargs): ``conv_A_field``, ``conv_B_field``; optional ``prompt_field``,
    ``conv_A_reward_field``, ``conv_B_reward_field``. Needs a tokenizer with a chat template
    and a bos token."""

    def preprocess(self, kwargs):
        self.conv_A_field, self.conv_B_field = kwargs["conv_A_field"], kwargs["conv_B_field"]
        self.prompt_field = kwargs.get("prompt_field")
        self.conv_A_reward_field = kwargs.get("conv_A_reward_field")
        self.conv_B_reward_field = kwargs.get("conv_B_reward_field")
        self.fields_to_pad = ["chosen_output", "rejected_output"]
        self.fields_to_mask = ["chosen_output", "rejected_output"]

    def _chat_text(self, conversation) -> str:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        bos = self.tokenizer.bos_token
        if bos is None:
            raise ValueError("ReftRewardDataset strips the bos text from the chat template (as pyreft); "
                             "the tokenizer has no bos_token: set tokenizer.bos_token")
        return text.replace(bos, "")

    def tokenize(self, data_item):
        result = {}
        conv_a, conv_b = data_item[self.conv_A_field], data_item[self.conv_B_field]
        if self.prompt_field is not None:
            user = {"role": "user", "content": data_item[self.prompt_field]}
            conv_a = [user, {"role": "assistant", "content": conv_a}]
            conv_b = [user, {"role": "assistant", "content": conv_b}]
            data_item[self.conv_A_field], data_item[self.conv_B_field] = conv_a, conv_b   # as pyreft
        chosen, rejected = self._chat_text(conv_a), self._chat_text(conv_b)
        if self.conv_A_reward_field is not None:
            result["chosen_reward"] = data_item[self.conv_A_reward_field]
            result["rejected_reward"] = data_item[self.conv_B_reward_field]
            if result["chosen_reward"] < result["rejected_reward"]:
                chosen, rejected = rejected, chosen
                result["chosen_reward"], result["rejected_reward"] = \
                    result["rejected_reward"], result["chosen_reward"]
        chosen_ids, rejected_ids = tokenize_ids(self.tokenizer, chosen), tokenize_ids(self.tokenizer, rejected)
        shared = 0
        for a, b in zip(chosen_ids.tolist(), rejected_ids.tolist()):
            shared += 1
            if a != b:
                break
        result["chosen_output"], result["rejected_output"] = chosen_ids, rejected_ids
        return result, shared - 1


@dataclass
class ReftRewardCollator:
    """Pairs -> rows ``[chosen_0, rejected_0, chosen_1, ...]`` with ``input_ids``,
    ``attention_mask``, ``reward`` and ``intervention_locations`` (pyreft's collator)."""

    tokenizer: Any
    padding: Union[bool, str] = True
    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None
    return_tensors: str = "pt"

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        rows = []
        for f in features:
            for side, default in (("chosen", 1.0), ("rejected", 0.0)):
                rows.append({"input_ids": f[f"{side}_output"], "attention_mask": f[f"{side}_output_mask"],
                             "reward": f.get(f"{side}_reward", default),
                             "intervention_locations": f["intervention_locations"]})
        batch = self.tokenizer.pad(rows, padding=self.padding, max_length=self.max_length,
                                   pad_to_multiple_of=self.pad_to_multiple_of, return_tensors=self.return_tensors)
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "reward", "intervention_locations")}
        batch["intervention_locations"] = batch["intervention_locations"][..., :batch["input_ids"].shape[-1]]
        return batch
