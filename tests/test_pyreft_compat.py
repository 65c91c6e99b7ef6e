"""pyreft drop-in pieces: the ``pyreft`` alias, pyreft's data order in the trainer, and
pyreft's dataset classes (hook order, pad modes, masked fields, preference/reward data).

pyreft itself is not needed here; tests/parity/ compares against it item for item.
"""
import os
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
import transformers
from transformers import TrainingArguments

import reft_kernels as rk
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers.logging.set_verbosity_error()


def run_py(code, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code, *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# --------------------------------------------------------------------------------------------
# alias
def test_as_pyreft_makes_pyreft_imports_resolve_to_reft_kernels():
    out = run_py(textwrap.dedent("""
        import reft_kernels as rk
        rk.as_pyreft()
        import pyreft, pyreft.utils
        from pyreft.utils import TaskType
        from pyreft.reft_trainer import ReftTrainerForCausalLM
        from pyreft.dataset import ReftDataset
        import reft_kernels.training.reft_trainer as real
        assert pyreft is rk and pyreft.utils is rk.utils
        assert TaskType is rk.TaskType and ReftDataset is rk.ReftDataset
        assert ReftTrainerForCausalLM is rk.ReftTrainerForCausalLM
        assert real.__spec__.name == "reft_kernels.training.reft_trainer"   # the shared module keeps its name
        assert rk.as_pyreft() is rk                                 # idempotent
        # exact (default): rotations keep pyreft's d x d base unless an intervention says otherwise
        iv = pyreft.LoreftIntervention(embed_dim=16, low_rank_dimension=2)
        assert iv.rotate_layer.base is not None and iv.rotate_layer.base.shape == (16, 16)
        assert pyreft.LoreftIntervention(embed_dim=16, low_rank_dimension=2, pyreft_base=False).rotate_layer.base is None
        assert pyreft.LoreftIntervention(embed_dim=16, low_rank_dimension=2,
                                         orthogonal_map="cholesky_qr").rotate_layer.orthogonal_map == "cholesky_qr"
        rk.as_pyreft(exact=False)
        assert pyreft.LoreftIntervention(embed_dim=16, low_rank_dimension=2).rotate_layer.base is None
        print("OK")
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_every_pyreft_submodule_name_resolves_both_ways():
    """pyreft's six submodule names: ``import pyreft.<name>`` under the alias, and attributes of
    ``import reft_kernels as pyreft``, both the module that holds pyreft's names."""
    out = run_py(textwrap.dedent("""
        import importlib
        import reft_kernels as rk
        homes = rk._PYREFT_SUBMODULES
        assert sorted(homes) == ["config", "dataset", "interventions", "reft_model", "reft_trainer", "utils"]
        for name, home in homes.items():
            assert getattr(rk, name) is importlib.import_module("reft_kernels." + home), name
            assert name in dir(rk)
        assert rk.interventions.LoreftIntervention is rk.LoreftIntervention
        assert {"LoreftIntervention", "LowRankRotateLayer"} <= set(dir(rk.interventions))
        import reft_kernels.interventions.registry        # our package loaded before the alias
        rk.as_pyreft()
        import pyreft.config, pyreft.dataset, pyreft.interventions, pyreft.reft_model, pyreft.reft_trainer
        from pyreft.interventions import LoreftIntervention
        from pyreft.config import ReftConfig
        from pyreft.reft_model import ReftModel
        for name, home in homes.items():
            assert importlib.import_module("pyreft." + name) is importlib.import_module("reft_kernels." + home)
        assert LoreftIntervention is rk.LoreftIntervention and ReftConfig is rk.ReftConfig
        assert ReftModel is rk.ReftModel
        assert rk.interventions.registry is importlib.import_module("reft_kernels.interventions.registry")
        print("OK")
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_as_pyreft_refuses_to_shadow_another_module():
    out = run_py("import sys, types; sys.modules['pyreft'] = types.ModuleType('pyreft');"
                 "import reft_kernels as rk; rk.as_pyreft()")
    assert out.returncode != 0
    assert "already imported as 'pyreft'" in out.stderr and "replace=True" in out.stderr


def test_pyreft_alias_runs_a_script_unmodified(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 7\n")   # a helper beside the script, as pyreft's examples
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        from helper import VALUE
        from pyreft import TaskType, get_reft_model, ReftTrainerForCausalLM
        from pyreft.utils import TaskType as T2
        if __name__ == "__main__":
            print(VALUE, TaskType.CAUSAL_LM.value, T2 is TaskType, sys.argv[1:])
    """))
    out = run_py(None, "-W", "error::RuntimeWarning", "-m", "reft_kernels.compat.pyreft.alias", str(script),
                 "--seed", "42", cwd=str(tmp_path.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7 CAUSAL_LM True ['--seed', '42']"


def test_default_rotation_has_pyreft_completion_but_not_pyreft_base():
    """The default completion is pyreft's d x d one (issue 20); without pyreft_base=True the
    trainer keeps HF's loader (see test_pyreft_data_order_default_follows_pyreft_base)."""
    rot = rk.LoreftIntervention(embed_dim=16, low_rank_dimension=2).rotate_layer
    assert rot.completion == "pyreft" and rot.base.shape == (16, 16) and rot.pyreft_base is False
    for light in ({"completion": "compact"}, {"pyreft_base": False}):
        assert rk.LoreftIntervention(embed_dim=16, low_rank_dimension=2, **light).rotate_layer.base is None


def test_namespace_names_resolve_as_attributes():
    assert rk.utils.TaskType.SEQ_CLS == "SEQ_CLS"
    assert rk.reft_trainer.ReftTrainer is rk.ReftTrainer
    for name in ("utils", "reft_trainer", "TaskType", "ReftRawDataset", "ReftPreferenceDataset",
                 "ReftRewardDataset", "ReftRewardCollator"):
        assert name in dir(rk)


# --------------------------------------------------------------------------------------------
# data order
D, R = 32, 4


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(["alpha beta gamma delta epsilon zeta eta theta", "iota kappa lambda"])


def reft(tok, pyreft_base):
    model = tiny_llama(len(tok), hidden_size=D, num_layers=2, num_heads=2, seed=0)
    reps = [{"layer": 1, "component": "block_output", "low_rank_dimension": R,
             "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32,
                                                   pyreft_base=pyreft_base)}]
    return rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")


def dm(tok, model, n=12):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    prompts = [" ".join(words[i % 5: i % 5 + 3]) + " " for i in range(n)]
    return rk.make_last_position_supervised_data_module(tok, model, prompts, ["eta theta"] * n)


def trainer(tmp_path, model, data, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0)
    return rk.ReftTrainerForCausalLM(model=model, args=args, **data, **kw)


@pytest.mark.parametrize("pyreft_base,explicit,expected", [
    (True, None, True), (False, None, False), (False, True, True), (True, False, False)])
def test_pyreft_data_order_default_follows_pyreft_base(tok, tmp_path, pyreft_base, explicit, expected):
    model = reft(tok, pyreft_base)
    tr = trainer(tmp_path, model, dm(tok, model.model), pyreft_data_order=explicit)
    assert tr.pyreft_data_order is expected
    dl = tr.get_train_dataloader()
    assert (type(dl) is torch.utils.data.DataLoader) is expected


def test_pyreft_data_order_is_a_plain_shuffle_from_the_global_stream(tok, tmp_path):
    """pyreft's loader: the permutation comes from the global torch stream at iteration start,
    exactly as torch's own ``DataLoader(shuffle=True)``; HF's loader gives another one."""
    model = reft(tok, True)
    data = dm(tok, model.model, n=16)
    ours = trainer(tmp_path, model, data).get_train_dataloader()
    hf = trainer(tmp_path, model, data, pyreft_data_order=False).get_train_dataloader()
    plain = torch.utils.data.DataLoader(data["train_dataset"], batch_size=4, shuffle=True)

    def order(loader):
        torch.manual_seed(123)
        return list(iter(loader.batch_sampler if hasattr(loader, "batch_sampler") else loader))

    assert order(ours) == order(plain)
    first = torch.manual_seed(123) and [b["input_ids"].tolist() for b in ours]
    torch.manual_seed(123)
    hf_batches = [b["input_ids"].tolist() for b in hf]
    assert first != hf_batches
    with pytest.raises(ValueError, match="pyreft_data_order"):
        trainer(tmp_path, model, data, pyreft_data_order="yes")


def test_training_with_pyreft_data_order(tok, tmp_path):
    """The plain loader trains through the whole HF loop (here: this transformers version), with
    gradient accumulation, and the same seed gives the same run."""
    def run():
        torch.manual_seed(1)   # the interventions' initialisation
        model = reft(tok, True)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                 use_cpu=True, save_strategy="no", seed=0, max_steps=3, logging_steps=1,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, disable_tqdm=True)
        tr = rk.ReftTrainerForCausalLM(model=model, args=args, **dm(tok, model.model))
        assert tr.pyreft_data_order
        tr.train()
        return [h["loss"] for h in tr.state.log_history if "loss" in h]
    first = run()
    assert len(first) == 3 and all(0 < x < 20 for x in first)
    assert run() == first


# --------------------------------------------------------------------------------------------
# dataset classes
class GlueLike(rk.ReftDataset):
    """pyreft's GLUE pattern: pad_mode 'last', labels from a column, num_labels set in postprocess."""

    def preprocess(self, kwargs):
        self.pad_mode = "last"
        self.fields_to_pad = ["input_ids"]   # the label is a class id, not a sequence
        self.calls = ["preprocess"]

    def postprocess(self, kwargs):
        self.calls.append(f"postprocess:{len(self.task_dataset)}")
        self.num_labels = len(set(self.task_dataset["label"]))

    def tokenize(self, item):
        ids = torch.tensor(self.tokenizer(item["text"])["input_ids"])
        return {"input_ids": ids, "labels": item["label"]}, len(ids)


class HoldOut(rk.ReftSupervisedDataset):
    """pyreft's gsm8k pattern: postprocess removes a validation hold-out from train."""

    def postprocess(self, kwargs):
        if self.data_split == "train":
            self.task_dataset = self.task_dataset.select(range(2, len(self.task_dataset)))


def test_reft_dataset_pad_mode_last_and_postprocess(tok):
    rows = datasets.Dataset.from_dict({"text": ["alpha beta gamma delta", "iota kappa"], "label": [1, 0]})
    ds = GlueLike("glue", None, tok, dataset=rows, position="f1+l1", num_interventions=2)
    assert ds.calls == ["preprocess", "postprocess:2"] and ds.num_labels == 2
    item = ds[0]
    n = len(tok("alpha beta gamma delta")["input_ids"])
    assert item["input_ids"][-1].item() == tok.pad_token_id and len(item["input_ids"]) == n + 1
    assert item["intervention_locations"] == [[0], [n - 1]]      # no +1 shift in "last" mode
    assert item["attention_mask"].tolist() == [1] * n + [0] and item["labels"] == 1
    ds = GlueLike("glue", None, tok, dataset=rows, position="f2+l2", num_interventions=2)
    assert len(tok("iota kappa")["input_ids"]) == 2               # L=2: f2+l2 clamps to 1 + 1
    assert ds[1]["intervention_locations"] == [[0, 2], [1, 2]]    # the padding slots point at the pad (L)


def test_reft_dataset_postprocess_holds_out_validation(tok):
    rows = datasets.Dataset.from_dict({"instruction": [f"alpha {w}" for w in "beta gamma delta eta".split()],
                                       "input": [""] * 4, "output": ["theta"] * 4})
    kw = dict(position="l1", num_interventions=1, input_field="input", output_field="output",
              instruction_field="instruction")
    train = HoldOut("gsm8k", None, tok, dataset=rows, **kw)
    assert len(train) == 2 and train.raw_dataset is None
    test = HoldOut("gsm8k", None, tok, dataset=rows, data_split="test", **kw)
    assert len(test) == 4 and len(test.raw_dataset) == 4
    item = train[0]
    assert item["input_ids"][0].item() == tok.pad_token_id and item["labels"][0].item() == -100
    assert item["attention_mask"].dtype == torch.int32


def test_reward_dataset_masks_each_field_and_collates_pairs():
    tok = build_word_tokenizer(["user assistant good bad reply question"])
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    rows = datasets.Dataset.from_dict({"q": ["question", "question reply"], "a": ["good", "bad"],
                                       "b": ["bad", "good reply"], "ra": [0.1, 0.9], "rb": [0.5, 0.2]})
    ds = rk.ReftRewardDataset("x", None, tok, dataset=rows, position="l1", num_interventions=1,
                              conv_A_field="a", conv_B_field="b", prompt_field="q",
                              conv_A_reward_field="ra", conv_B_reward_field="rb")
    first = ds[0]
    assert "attention_mask" not in first
    for side in ("chosen_output", "rejected_output"):
        assert first[side][0].item() == tok.pad_token_id            # the sink token on both
        assert first[f"{side}_mask"].tolist()[0] == 0
    assert first["chosen_reward"] == 0.5 and first["rejected_reward"] == 0.1   # swapped: better first
    batch = rk.ReftRewardCollator(tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["reward"].tolist() == pytest.approx([0.5, 0.1, 0.9, 0.2])
    assert batch["intervention_locations"].shape == (4, 1, 1)


def test_preference_dataset_pads_inputs_and_labels_to_one_length():
    tok = build_word_tokenizer(["do this good answer here bad"])
    rows = datasets.Dataset.from_dict({"instruction": ["do this"], "input": [""],
                                       "chosen": ["good answer here"], "rejected": ["bad"]})
    ds = rk.ReftPreferenceDataset("x", None, tok, dataset=rows, position="l1", num_interventions=1,
                                  instruction_field="instruction", input_field="input",
                                  chosen_output_field="chosen", rejected_output_field="rejected")
    item = ds[0]
    assert item["input_ids"].shape == item["labels"].shape
    assert item["input_ids"][-1].item() == tok.pad_token_id and item["attention_mask"][-1].item() == 0
    prompt_len = len(tok(rk.dataset.prompt_no_input % "do this")["input_ids"])
    assert item["intervention_locations"] == [[prompt_len]]     # true last prompt token, +1 sink shift
    assert (item["labels"][:prompt_len + 1] == -100).all()


def test_raw_dataset_items(tok):
    rows = datasets.Dataset.from_dict({"instruction": ["alpha beta gamma"], "output": ["delta"]})
    train = rk.ReftRawDataset("x", None, tok, dataset=rows, position="f1+l1", num_interventions=2)
    test = rk.ReftRawDataset("x", None, tok, dataset=rows, data_split="test", position="f1+l1",
                             num_interventions=2)
    n = len(tok("alpha beta gamma")["input_ids"])
    assert train[0]["intervention_locations"] == [[1], [n]]
    assert "labels" in train[0] and "labels" not in test[0]
    assert len(test[0]["input_ids"]) == n + 1
