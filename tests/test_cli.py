"""The reft-kernels command: demo, train, generate, and clean errors (exit code 2, no traceback)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from reft_kernels.cli.main import main
from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved like a hub model."""
    rows = load_builtin_instructions()
    texts = [format_prompt(r["instruction"], r["input"]) for r in rows] + [r["output"] for r in rows]
    tok = build_word_tokenizer(texts, model_max_length=64)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, max_positions=64)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "reft_kernels", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_via_python_m():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "demo" in proc.stdout and "train" in proc.stdout


def test_train_then_generate(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", base_dir, "--data", "builtin", "--output", str(out), "--layers", "0,1",
                 "--positions", "f3+l3", "--rank", "2", "--epochs", "1", "--batch-size", "8", "--backend", "torch",
                 "--max-steps", "3"]) == 0
    assert (out / "adapter" / "adapter.safetensors").exists()
    info = json.loads((out / "reft_run.json").read_text())
    assert info["positions"] == "f3+l3" and info["num_interventions"] == 4
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "What is the capital of Italy?",
                 "--prompt", "Say hello.", "--max-new-tokens", "4", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert text.count(">>> ") == 2 and "capital of Italy" in text


def test_train_bf16_and_other_interventions(base_dir, tmp_path):
    for iv in ("noreft", "consreft"):
        assert main(["train", "--model", base_dir, "--data", "builtin", "--output", str(tmp_path / iv),
                     "--intervention", iv, "--positions", "l1", "--bf16", "--max-steps", "2",
                     "--backend", "torch"]) == 0


def _expect_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_bad_data_is_reported_cleanly(base_dir, tmp_path, capsys):
    train = ["train", "--model", base_dir, "--output", str(tmp_path / "o"), "--backend", "torch"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _expect_error(capsys, train + ["--data", str(empty)], "empty")
    cols = tmp_path / "cols.jsonl"
    cols.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    _expect_error(capsys, train + ["--data", str(cols)], "columns", "instruction/output")
    longp = tmp_path / "long.csv"
    longp.write_text("prompt,completion\n" + "what is " * 80 + ",yes\n")
    _expect_error(capsys, train + ["--data", str(longp)], "context is 64")
    _expect_error(capsys, train + ["--data", str(tmp_path / "missing.jsonl")], "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    _expect_error(capsys, train + ["--data", str(bad)], "could not be parsed")
    badcsv = tmp_path / "bad.csv"
    badcsv.write_text('prompt,completion\n"' + "x" * 200_000 + '",c\n')   # over csv's field limit
    _expect_error(capsys, train + ["--data", str(badcsv)], "could not be parsed")
    noinput = tmp_path / "noinput.jsonl"
    noinput.write_text(json.dumps({"input": "", "output": "b"}) + "\n")
    _expect_error(capsys, train + ["--data", str(noinput)], "example 0 has no value for ['input']")
    _expect_error(capsys, train + ["--data", "builtin", "--positions", "x7"], "--positions")
    _expect_error(capsys, train + ["--data", "builtin", "--layers", "0,9"], "layers 0..1")
    _expect_error(capsys, ["train", "--model", str(tmp_path / "nomodel"), "--data", "builtin",
                           "--output", str(tmp_path / "o2")], "could not be loaded")
    _expect_error(capsys, ["generate", "--adapter", str(tmp_path / "nothing"), "--prompt", "hi"], "not a directory")


def test_bad_rank_and_dropout_are_one_line_errors_with_exit_2(base_dir, tmp_path):
    """Issue: --rank above the hidden size and --dropout outside [0, 1) ended in a traceback, exit 1."""
    common = ["train", "--model", base_dir, "--data", "builtin", "--backend", "torch"]
    for extra, needle in ((["--rank", "1000"], "--rank 1000 is larger than the model's hidden size 32"),
                          (["--dropout", "1.5"], "--dropout 1.5 is a probability"),
                          (["--dropout", "-0.1"], "--dropout -0.1 is a probability")):
        proc = run_cli(*common, "--output", str(tmp_path / extra[1]), *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and lines[-1].startswith("reft-kernels train: error:"), proc.stderr
        assert needle in lines[-1]


def test_every_train_option_has_help_and_default():
    """``train --help`` describes every option and shows the default of every valued option."""
    from reft_kernels.cli.main import build_parser
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for action in train._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        valued = action.nargs != 0 and not action.required and action.default is not None
        if valued:
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings[0]


def test_argparse_errors_exit_2_without_traceback():
    proc = run_cli("train", "--model", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--data" in proc.stderr


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--ops", "torch", "--backend", "torch",
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "torch" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["identical_after_reload"] is True
    assert (tmp_path / "adapter" / "reft_config.json").exists()
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "What is grass?", "--max-new-tokens", "3",
                 "--backend", "torch"]) == 0


def test_full_demo_cuts_the_loss_by_half(tmp_path, capsys):
    """The real demo (60 epochs): its training loss must fall by at least 50%."""
    from reft_kernels.jobs.tiny_demo import run_tiny_demo as run_demo
    threads = torch.get_num_threads()
    m = run_demo(str(tmp_path), backend="torch", ops="none", log=lambda *a: None)
    torch.set_num_threads(threads)
    assert m["loss_cut"] >= 0.5, m
    assert m["identical_after_reload"]
    assert sum(a.startswith("the capital of italy is rome") for a in m["generations_after"]) == 1


def _example(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_examples_run(tmp_path, base_dir, capsys):
    """python/ examples, shortened: defaults (tiny local models) and --model with a local path."""
    assert _example("instruction_tuning").main(["--epochs", "1", "--backend", "torch",
                                                "--output", str(tmp_path / "it")]) == 0
    assert (tmp_path / "it" / "adapter" / "adapter.safetensors").exists()
    assert _example("roberta_classification").main(["--epochs", "1", "--backend", "torch",
                                                    "--output", str(tmp_path / "rb")]) == 0
    assert "eval accuracy" in capsys.readouterr().out
    mem = _example("memorisation")
    assert mem.main(["--tiny", "--max-steps", "3", "--backend", "torch"]) == 0
    assert mem.main(["--model", base_dir, "--max-steps", "3", "--backend", "torch", "--target", "snow is white ."]) in (0, 1)
    assert "exact prefix" in capsys.readouterr().out


def test_train_reads_csv_json_and_dataset_dirs(base_dir, tmp_path):
    import datasets
    rows = [{"prompt": "what color is snow ?", "completion": " snow is white ."}] * 4
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\nTranslate the word to French.,cat,chat\n" * 3)
    for i, data in enumerate((tmp_path / "ds", tmp_path / "d.json", tmp_path / "d.csv")):
        assert main(["train", "--model", base_dir, "--data", str(data), "--output", str(tmp_path / f"o{i}"),
                     "--max-steps", "1", "--backend", "torch", "--positions", "l2"]) == 0


def test_native_build_says_when_it_compiles(tmp_path, capsys):
    """The one-time native build (~1 min) is announced; loading a finished build is silent."""
    from reft_kernels.ops.native_backend import _guarded_build
    with _guarded_build("ext", str(tmp_path)):
        pass
    err = capsys.readouterr().err
    assert "compiling the native C++ kernels, one time only" in err and "built in" in err
    (tmp_path / "ext.so").write_bytes(b"")
    with _guarded_build("ext", str(tmp_path)):
        pass
    assert capsys.readouterr().err == ""


def test_native_build_removes_a_killed_builds_lock_and_waits_for_a_live_one(tmp_path, capsys):
    """torch's 'lock' file left by a killed build made every later build wait forever; a build
    that is really running (it holds build.flock) is waited for."""
    import threading
    import time

    from reft_kernels.ops.native_backend import _guarded_build
    fcntl = pytest.importorskip("fcntl")             # POSIX
    (tmp_path / "ext.so").write_bytes(b"")
    (tmp_path / "lock").write_bytes(b"")              # what a killed build leaves behind
    with _guarded_build("ext", str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    err = capsys.readouterr().err
    assert "removed the stale lock file" in err and str(tmp_path / "lock") in err
    holder = open(tmp_path / "build.flock", "a")      # a live build elsewhere holds the OS lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    (tmp_path / "lock").write_bytes(b"")              # and torch's baton
    released = []

    def finish_other_build():
        time.sleep(0.5)
        (tmp_path / "lock").unlink()
        released.append(time.monotonic())
        holder.close()
    threading.Thread(target=finish_other_build).start()
    with _guarded_build("ext", str(tmp_path)):
        entered = time.monotonic()
    assert released and entered >= released[0]       # waited for the live build, removed nothing
    err = capsys.readouterr().err
    assert "waiting for another process's build" in err and "stale" not in err
