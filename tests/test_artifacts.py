"""reft_kernels.artifacts: reft_run.json, adapter-directory resolution and the prompt template,
as both callers see them (``reft-kernels generate`` and the server), and the generation inputs
they share (left padding + positions)."""
import json
from argparse import Namespace

import pytest
import torch

from reft_kernels.artifacts import (RUN_INFO, AdapterError, apply_template, read_adapter_spec, read_run_info,
                                    resolve_adapter, write_run_info)
from reft_kernels.cli.main import CliError, generate_adapter
from reft_kernels.data.positions import (get_intervention_locations, left_pad, make_generation_inputs,
                                         prompt_locations)
from reft_kernels.data.templates import no_header_prompt_template
from reft_kernels.jobs.prompts import PROMPT_TEMPLATE, format_prompt


@pytest.fixture
def run(tmp_path):
    """A run directory as `reft-kernels train` leaves it, plus a second adapter folder inside it."""
    root = tmp_path / "run"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "w.safetensors").write_text("x")
    (root / "other").mkdir()
    (root / "other" / "w.safetensors").write_text("x")
    write_run_info(str(root), model="base", positions="f2+l1", share_weights=True, template="chat", dtype="float32")
    return root


def _cli(path, positions=None, template=None):
    return generate_adapter(Namespace(adapter=str(path), positions=positions, template=template))


def test_run_info_round_trip_and_parent_lookup(run):
    info, where = read_run_info(str(run / "adapter"))
    assert where == str(run) and info["positions"] == "f2+l1"
    assert json.loads((run / RUN_INFO).read_text()) == info
    assert read_run_info(str(run.parent)) == ({}, str(run.parent))


@pytest.mark.parametrize("sub, expected", [("", "adapter"), ("adapter", "adapter"), ("other", "other")])
def test_both_callers_resolve_the_same_directory(run, sub, expected):
    """The run directory -> its adapter/; an adapter folder inside it -> itself (reft-kernels generate
    used to take adapter/ for any folder whose parent had one)."""
    path = run / sub if sub else run
    cli, server = _cli(path), read_adapter_spec("a", str(path))
    for spec in (cli, server):
        assert spec.adapter_dir == str(run / expected)
        assert (spec.positions, spec.share_weights, spec.template, spec.base_model) == ("f2+l1", True, "chat", "base")
    assert server.name == "a" and cli.name is None
    assert resolve_adapter(path).adapter_dir == str(run / expected)   # a pathlib.Path, as Python callers pass it


def test_flags_override_or_default(run, tmp_path):
    # generate --positions/--template override the recorded ones; serve --template overrides,
    # serve --positions only fills in a missing rule
    assert _cli(run, positions="l3", template="none").positions == "l3"
    assert _cli(run, template="none").template == "none"
    assert read_adapter_spec("a", str(run), default_positions="l3", default_template="none").positions == "f2+l1"
    assert read_adapter_spec("a", str(run), default_template="none").template == "none"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "w.safetensors").write_text("x")
    spec = read_adapter_spec("b", str(bare), default_positions="l1")
    assert (spec.adapter_dir, spec.positions, spec.template, spec.base_model) == (str(bare), "l1", "instruction", None)


def test_bad_adapters_name_the_argument_and_the_fix(run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / RUN_INFO).write_text("[1, 2]")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RUN_INFO).write_text("{")
    (tmp_path / "norule").mkdir()
    (tmp_path / "norule" / "w.safetensors").write_text("x")
    write_run_info(str(tmp_path / "stringly"), positions="f1+l1", share_weights="false")   # bool("false") is True
    write_run_info(str(tmp_path / "fancy"), positions="l1", template="fancy")
    cases = [(tmp_path / "missing", "is not a directory"), (tmp_path / "file", "is not a directory"),
             (tmp_path / "empty", "is an empty directory"), (tmp_path / "listed", "holds a JSON list"),
             (tmp_path / "broken", "cannot be read"), (tmp_path / "norule", "recording its training positions"),
             (tmp_path / "stringly", "records share_weights='false'; write true or false"),
             (tmp_path / "fancy", f"the template its {RUN_INFO} records, 'fancy' is not one of")]
    for path, message in cases:
        with pytest.raises(CliError, match=f"^--adapter: .*{message}"):
            _cli(path)
        with pytest.raises(AdapterError, match=f"^adapter 'x': .*{message}"):
            read_adapter_spec("x", str(path))
    with pytest.raises(CliError, match="pass --positions"):
        _cli(tmp_path / "norule")
    with pytest.raises(AdapterError, match="start the server with --positions"):
        read_adapter_spec("x", str(tmp_path / "norule"))
    with pytest.raises(CliError, match="positions='x7' is not valid"):
        _cli(run, positions="x7")
    with pytest.raises(AdapterError, match="template 'fancy' is not one of"):
        resolve_adapter(str(run), template="fancy")
    with pytest.raises(AdapterError, match="adapter name '' must be a non-empty string"):
        read_adapter_spec("", str(run))


def test_the_vllm_store_locates_adapters_as_the_cli_does(run, tmp_path, monkeypatch):
    """The vLLM plugin's adapter store reads reft_run.json through the same function: the same
    checkpoint directory, and an unusable reft_run.json named as such (not an AttributeError)."""
    from transformers import LlamaConfig

    from reft_kernels.checkpoint import api
    from reft_kernels.vllm_plugin.store import AdapterStore
    read = []

    class Read(Exception):
        pass

    def read_for_model(adapter_dir, model):
        read.append(adapter_dir)
        raise Read
    monkeypatch.setattr(api, "read_for_model", read_for_model)
    store = AdapterStore(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=10), torch.float32, "cpu", 2)
    for path in (run, run / "adapter", run / "other"):
        with pytest.raises(Read):
            store.load("a", str(path))
        assert read[-1] == _cli(path).adapter_dir
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / RUN_INFO).write_text("[1, 2]")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RUN_INFO).write_text("{")
    for name, message in (("listed", "holds a JSON list"), ("broken", "cannot be read")):
        with pytest.raises(AdapterError, match=f"^adapter 'x': its {RUN_INFO} {message}"):
            store.load("x", str(tmp_path / name), "l1")
    assert not store.adapters


def test_one_prompt_template():
    assert PROMPT_TEMPLATE is no_header_prompt_template
    assert apply_template("instruction", "Hi") == format_prompt("Hi") == no_header_prompt_template % "Hi"
    assert apply_template("none", "Hi", "there") == "Hi\n\nthere"
    assert apply_template("auto", "Hi") == format_prompt("Hi")          # no tokenizer: no chat template
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        apply_template("chat", "Hi")
    with pytest.raises(ValueError, match="'fancy' is not one of"):
        apply_template("fancy", "Hi")


class _Tok:
    pad_token_id, eos_token_id = 0, 9

    def __call__(self, text):
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_generation_inputs_are_left_padding_plus_prompt_locations():
    """make_generation_inputs (CLI, jobs) and the server's batches use the same two functions; the
    result equals pyreft's per-prompt positions shifted by each row's padding."""
    ids, mask, pads = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]] and pads == [0, 2]
    base = get_intervention_locations(last_position=4, positions="f1+l1", num_interventions=2)
    assert base == [[0], [3]]
    assert prompt_locations(4, "f1+l1", 2, False, pad=2, num_slots=3) == [[2], [5], [-1]]
    batch = make_generation_inputs(_Tok(), ["abcde", "ab"], "f2+l2", 2, False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [0, 0, 0, 1, 2]]
    for row, (length, pad) in enumerate([(5, 0), (2, 3)]):
        expect = get_intervention_locations(last_position=length, positions="f2+l2", num_interventions=2)
        got = batch["intervention_locations"][row].tolist()
        assert got == [[p + pad if p >= 0 else -1 for p in r] + [-1] * (len(got[0]) - len(r)) for r in expect]
    assert batch["intervention_locations"].dtype == torch.long
