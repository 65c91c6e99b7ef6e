"""pyreft's paper script, run unchanged under pyreft 0.1.0 and under reft_kernels
(``python -m reft_kernels.compat.pyreft.alias train.py ...``): the same losses and generations.

The script folder (pyreft_examples/loreft: train.py, dataset.py, task_config.py, templates.py,
compute_metrics.py) is a minimal copy of pyreft's examples/loreft with the same flags and flow
(pyreft's wheel and sdist do not ship its examples); see each file's docstring for what differs.
Data: a commonsense-style task in local JSON files; model: a tiny Llama saved with its word-level
tokenizer. Flags as the issue's run: layers 0;1, rank 4, f3+l3, share_weights, seed 42,
--save_model (into the run directory that already holds args.json), fp32, dropout 0, wd 0.

Run in the parity venv by .ci/pyreft_parity.sh; skipped where pyreft is not importable.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

from pyreft_env import PARITY_DIR, ROOT, require_pyreft  # noqa: E402

pyreft = require_pyreft()

import torch

import reft_kernels as rk
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama

HERE = PARITY_DIR
SCRIPT_DIR = os.path.join(HERE, "pyreft_examples", "loreft")
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "sheep", "goat", "mouse"]


def rows(n, offset):
    out = []
    for i in range(n):
        a, c = ANIMALS[(i + offset) % 8], COLORS[(3 * i + offset) % 8]
        out.append({"instruction": f"which color is the {a} ? answer with one color .", "answer": c})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("script")
    data = root / "datasets"
    for name, split, items in (("commonsense_170k", "train", rows(24, 0)), ("boolq", "test", rows(8, 0))):
        (data / name).mkdir(parents=True)
        (data / name / f"{split}.json").write_text(json.dumps(items))
    texts = [r["instruction"] + " " + r["answer"] for r in rows(24, 0)] + \
        ["the correct answer is"]
    tok = build_word_tokenizer(texts)
    model = tiny_llama(len(tok), hidden_size=64, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


FLAGS = ["-task", "commonsense", "-l", "0;1", "-r", "4", "-p", "f3+l3", "-share_weights", "-e", "3",
         "-seed", "42", "-lr", "5e-2", "-batch_size", "4", "-gradient_accumulation_steps", "1",
         "-eval_batch_size", "4", "-dtype", "float32", "-max_length", "128", "-save_model"]


def run(setup, lib):
    out_dir = setup / f"out_{lib}"
    flags = ["-data_dir", str(setup / "datasets"), "-model", str(setup / "model"), "-output_dir", str(out_dir)]
    prefix = [sys.executable, "-m", "reft_kernels.compat.pyreft.alias"] if lib == "reft_kernels" else [sys.executable]
    env = dict(os.environ, PYTHONPATH=ROOT, REFT_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1")
    proc = subprocess.run(prefix + [os.path.join(SCRIPT_DIR, "train.py")] + FLAGS + flags, cwd=str(setup),
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = glob.glob(str(out_dir / "*"))
    return run_dir


@pytest.fixture(scope="module")
def runs(setup):
    return run(setup, "pyreft"), run(setup, "reft_kernels")


def load(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def test_same_losses(runs):
    theirs, ours = (load(r, "losses.json") for r in runs)
    assert len(theirs) == len(ours) == 18                       # 24 examples / 4 x 3 epochs
    assert theirs[-3:] != theirs[:3]
    # HF logs losses rounded to 4 decimals; the unrounded curves agree to ~1e-7 (trainer parity test)
    assert max(abs(a - b) for a, b in zip(theirs, ours)) <= 1.01e-4, (theirs, ours)


def test_same_generations(runs):
    theirs, ours = (load(r, "boolq_test_outputs.json") for r in runs)
    assert len(theirs) == 8
    assert [g["generation"] for g in ours] == [g["generation"] for g in theirs]
    assert load(runs[1], "eval_results.json") == load(runs[0], "eval_results.json")


def test_save_model_writes_into_the_run_directory(runs, setup):
    """--save_model saves into the run directory beside args.json; our checkpoint and pyreft's
    (both read here) hold the same trained interventions."""
    theirs, ours = runs
    assert {"args.json", "losses.json", "reft_config.json", "adapter.safetensors"} <= set(os.listdir(ours))
    assert {"args.json", "config.json"} <= set(os.listdir(theirs))
    assert load(ours, "args.json")["task"] == "commonsense"
    from transformers import AutoModelForCausalLM

    def logits(run_dir):
        reft = rk.ReftModel.load(run_dir, AutoModelForCausalLM.from_pretrained(str(setup / "model"))).eval()
        assert len(reft.interventions) == 2
        x = torch.arange(4, 16).view(1, 12)
        locs = [[[0, 1, 2, 9, 10, 11]]] * 2
        with torch.no_grad():
            return reft({"input_ids": x}, unit_locations={"sources->base": (None, locs)})[1].logits
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-4, atol=1e-5)
