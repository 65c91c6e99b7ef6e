"""pyreft's dataset semantics: the paper script's GLUE-style and gsm8k-style ReftDataset
subclasses (pyreft_examples/loreft/dataset.py: pad_mode "last" with only input_ids padded and
num_labels from postprocess; gsm8k's validation hold-out removed from train in postprocess)
give the same items (input_ids, labels, intervention_locations, attention_mask, id), the same
splits and num_labels under pyreft 0.1.0 and under reft_kernels.

Run in the parity venv by .ci/pyreft_parity.sh; skipped where pyreft is not importable.
"""
import json
import os
import subprocess
import sys

import pytest

from pyreft_env import PARITY_DIR, ROOT, require_pyreft  # noqa: E402

pyreft = require_pyreft()

import torch

from reft_kernels.base_models.tiny import build_word_tokenizer

HERE = PARITY_DIR
WORDS = "the a cat dog sat on mat big small red runs fast slow how many apples are left".split()


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    sst2 = [{"sentence": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + i % 6)), "label": i % 2,
             "label_names": ["negative", "positive"]} for i in range(12)]
    gsm = [{"question": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 5)) + " ?",
            "answer": f"{WORDS[i % len(WORDS)]} #### {i % 7}"} for i in range(310)]
    for name, split, rows in (("sst2", "train", sst2), ("sst2", "validation", sst2[:5]),
                              ("gsm8k", "train", gsm), ("gsm8k", "test", gsm[:6])):
        (root / name).mkdir(exist_ok=True)
        (root / name / f"{split}.json").write_text(json.dumps(rows))
    tok = build_word_tokenizer(WORDS + ["? ####", "First think step by step and then answer the final number.",
                                        "Question: The final answer is:"] + [str(i) for i in range(7)])
    tok.save_pretrained(root / "tok")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    for lib, prefix in (("pyreft", []), ("reft_kernels", ["-m", "reft_kernels.compat.pyreft.alias"])):
        target = root / f"{lib}.pt"
        proc = subprocess.run([sys.executable, *prefix, os.path.join(HERE, "dump_paper_datasets.py"),
                               str(root), str(root / "tok"), str(target)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[lib] = torch.load(target, weights_only=False)
    return out


def test_same_splits_and_items(dumps):
    theirs, ours = dumps["pyreft"], dumps["reft_kernels"]
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key]["num_labels"] == theirs[key]["num_labels"], key
        assert ours[key]["raw"] == theirs[key]["raw"], key
        assert len(ours[key]["items"]) == len(theirs[key]["items"]), key
        for i, (a, b) in enumerate(zip(ours[key]["items"], theirs[key]["items"])):
            assert a == b, (key, i, a, b)


def test_the_cases_that_matter_are_exercised(dumps):
    """GLUE: sink appended, label left an int, pads point at the sink (index L), num_labels = 2;
    gsm8k: 300 held out of train into validation."""
    d = dumps["pyreft"]
    assert d["glue_untied/train"]["num_labels"] == 2
    item = d["glue_untied/train"]["items"][0]
    n = len(item["input_ids"]) - 1
    assert isinstance(item["labels"], int) and item["attention_mask"][-1] == 0
    assert any(n in row for row in item["intervention_locations"])   # a short sentence: padded slots
    assert len(d["gsm8k/train"]["items"]) == 10 and len(d["gsm8k/validation"]["items"]) == 300
    assert len(d["gsm8k/test"]["items"]) == 6 and "labels" not in d["gsm8k/test"]["items"][0]
