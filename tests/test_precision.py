"""``--dtype auto|float32|bfloat16``: detection from the CPU flags, the fallback message, and the
CLI: train records the base dtype, generate reuses it, cheap argument checks run before the model
loads, and an empty adapter directory is named as such."""
import json

import pytest
import torch

from reft_kernels.cli.main import main
from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama
from reft_kernels.model.precision import cpu_bf16_flags, resolve_dtype


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


def test_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f avx512_bf16 amx_tile amx_bf16")) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f")) == ()
    assert cpu_bf16_flags(str(tmp_path / "absent")) == ()


def test_auto_picks_bf16_only_where_the_cpu_has_it(tmp_path):
    said = []
    assert resolve_dtype("auto", cpuinfo=_cpuinfo(tmp_path, "amx_bf16"), log=said.append) == torch.bfloat16
    assert said == []
    assert resolve_dtype("auto", cpuinfo=_cpuinfo(tmp_path, "avx2"), log=said.append) == torch.float32
    assert len(said) == 1 and "float32" in said[0] and "avx512_bf16/amx_bf16" in said[0]
    assert resolve_dtype("bfloat16", cpuinfo=_cpuinfo(tmp_path, "avx2")) == torch.bfloat16   # asked for: honoured
    assert resolve_dtype(torch.float32) == torch.float32


def test_bad_dtype_names_the_choices():
    with pytest.raises(ValueError, match="--dtype 'float16' is not one of auto, float32, bfloat16"):
        resolve_dtype("float16")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    rows = load_builtin_instructions()
    texts = [format_prompt(r["instruction"], r["input"]) for r in rows] + [r["output"] for r in rows]
    tok = build_word_tokenizer(texts, model_max_length=64)
    path = tmp_path_factory.mktemp("base")
    tiny_llama(len(tok), hidden_size=32, num_layers=3, num_heads=2, max_positions=64).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_train_records_the_dtype_and_generate_reuses_it(base_dir, tmp_path, capsys, dtype, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--model", base_dir, "--data", "builtin", "--output", str(out), "--layers", "1,2",
                 "--positions", "l1", "--rank", "2", "--max-steps", "3", "--batch-size", "8", "--backend", "torch",
                 "--dtype", dtype]) == 0
    assert json.loads((out / "reft_run.json").read_text())["dtype"] == dtype
    seen = []
    import reft_kernels.cli.main as cli
    real = cli.load_causal_lm
    monkeypatch.setattr(cli, "load_causal_lm", lambda name, d=None: seen.append(d) or real(name, d))
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "Say hello.", "--max-new-tokens", "3",
                 "--backend", "torch"]) == 0
    assert seen == [getattr(torch, dtype)] and capsys.readouterr().out.count(">>> ") == 1


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cheap_checks_run_before_the_model_loads(tmp_path, capsys):
    absent_model = str(tmp_path / "no_model")   # loading it would fail: these errors must come first
    common = ["train", "--model", absent_model, "--output", str(tmp_path / "o")]
    assert "does not exist" in _error(capsys, common + ["--data", str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in _error(capsys, common + ["--data", str(tmp_path / "empty.jsonl")])
    assert "--rank must be positive" in _error(capsys, common + ["--data", "builtin", "--rank", "0"])
    assert "--layers 'a,b'" in _error(capsys, common + ["--data", "builtin", "--layers", "a,b"])
    assert "--layers '-1'" in _error(capsys, common + ["--data", "builtin", "--layers=-1"])
    assert "--prefix-cache-max-gb" in _error(capsys, common + ["--data", "builtin", "--prefix-cache-max-gb", "0"])


def test_generate_on_an_empty_directory_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["generate", "--adapter", str(tmp_path / "empty"), "--prompt", "hi"])
    assert "is an empty directory: no adapter was saved there" in err
