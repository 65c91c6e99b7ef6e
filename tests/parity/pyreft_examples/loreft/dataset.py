"""The paper script's datasets (pyreft's examples/loreft/dataset.py, pyreft 0.1.0 era), minimal:
subclasses of pyreft.ReftDataset that use its hooks as the paper does.

* LoReftGLUEDataset: pad_mode "last" (sink token appended), only input_ids padded (the label is a
  class id), num_labels set in postprocess from the loaded data.
* LoReftSupervisedDataset: commonsense and gsm8k prompts; positions from the true prompt length;
  gsm8k holds the last GSM8K_HOLDOUT training examples out as its validation split (postprocess).

Differences from the paper's file, for an offline test: data comes from local JSON files
(``<data_dir>/<dataset>/<split>.json``) instead of the Hub, and GLUE rows carry their label
names in a ``label_names`` column instead of HF ClassLabel features.
"""
import os
from copy import deepcopy

from pyreft import ReftDataset

from task_config import task_config

IGNORE_INDEX = -100
GSM8K_HOLDOUT = 300
glue_task_to_keys = {"sst2": ("sentence", None), "rte": ("sentence1", "sentence2")}


class LoReftGLUEDataset(ReftDataset):

    def preprocess(self, kwargs):
        self.raw_dataset, self.trigger_tokens, self.num_labels = None, None, None
        self.pad_mode = "last"              # the sink token goes at the end
        self.fields_to_pad = ["input_ids"]  # labels are class ids
        self.sentence1_key, self.sentence2_key = glue_task_to_keys[os.path.basename(self.data_path)]
        self.data_path = os.path.join(self.data_path, self.data_split + ".json")

    def postprocess(self, kwargs):
        is_regression = os.path.basename(os.path.dirname(self.data_path)) == "stsb"
        self.num_labels = 1 if is_regression else len(self.task_dataset[0]["label_names"])

    def tokenize(self, data_item):
        args = ((data_item[self.sentence1_key],) if self.sentence2_key is None
                else (data_item[self.sentence1_key], data_item[self.sentence2_key]))
        input_ids = self.tokenizer(*args, max_length=self.tokenizer.model_max_length, truncation=True,
                                   return_tensors="pt")["input_ids"][0]
        return {"input_ids": input_ids, "labels": data_item["label"]}, len(input_ids)


class LoReftSupervisedDataset(ReftDataset):

    def preprocess(self, kwargs):
        self.raw_dataset, self.trigger_tokens, self.num_labels = None, None, None
        config = task_config[self.task]
        self.task_prompt_template = config["task_prompt_template"]
        self.trigger_tokens = config["trigger_tokens"]
        self.original_data_split = self.data_split
        self.test_split = kwargs.get("test_split")
        if self.task == "gsm8k" and self.data_split != "test":
            self.data_split = "train"       # validation = the last examples of train
        self.data_path = os.path.join(self.data_path, self.data_split + ".json")

    def postprocess(self, kwargs):
        n = len(self.task_dataset)
        if self.task == "gsm8k" and self.original_data_split == "train" and self.test_split == "validation":
            self.task_dataset = self.task_dataset.select(range(n - GSM8K_HOLDOUT))
        if self.task == "gsm8k" and self.original_data_split == "validation":
            self.task_dataset = self.task_dataset.select(range(n - GSM8K_HOLDOUT, n))
        self.raw_dataset = self.task_dataset

    def tokenize(self, data_item):
        eos = self.tokenizer.eos_token
        if self.task == "commonsense":
            prompt = self.task_prompt_template % data_item["instruction"]
            full = prompt + self.trigger_tokens + data_item["answer"] + eos
        elif self.task == "gsm8k":
            prompt = self.task_prompt_template % (self.trigger_tokens.strip(), data_item["question"])
            full = prompt + data_item["answer"].replace("####", "The final answer is: ") + eos
        else:
            raise ValueError(f"Unrecognized task: {self.task}")
        tok = lambda text: self.tokenizer(text, max_length=self.tokenizer.model_max_length,  # noqa: E731
                                          truncation=True, return_tensors="pt")["input_ids"][0]
        prompt_ids = tok(prompt)
        result = {}
        if self.original_data_split == "train":
            input_ids = tok(full)
            labels = deepcopy(input_ids)
            labels[:len(prompt_ids)] = IGNORE_INDEX
            result["input_ids"], result["labels"] = input_ids, labels
        else:
            result["input_ids"] = prompt_ids
        return result, len(prompt_ids)
