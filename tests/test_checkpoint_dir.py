"""Saving into a directory that already holds other files (pyreft's run directory, a Trainer
output directory): only our checkpoint files change; saves are crash-safe
(reft_kernels.checkpoint.dir_merge)."""
import json
import os

import pytest
import torch

import reft_kernels as rk
from reft_kernels import checkpoint as ck
from reft_kernels.checkpoint import dir_merge
from reft_kernels.base_models.tiny import tiny_llama

D, R = 32, 4


def build(seed, trainable_head=False):
    model = tiny_llama(64, hidden_size=D, num_layers=2, num_heads=2, seed=0)
    torch.manual_seed(seed)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": R,
             "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)}
            for i in (0, 1)]
    rm = rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")
    with torch.no_grad():
        for p in rm.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    if trainable_head:
        rm.model.lm_head.weight.requires_grad_(True)
    return rm.eval()


def out(rm):
    x = torch.arange(3, 11).view(1, 8)
    with torch.no_grad():
        return rm({"input_ids": x}, unit_locations={"sources->base": (None, [[[1, 6]], [[2, 7]]])})[1].logits


def same(a, b):
    """Outputs of one checkpoint (a reload rebuilds the rotation from R: equal to rounding)."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def load_out(path):
    return out(rk.ReftModel.load(path, tiny_llama(64, hidden_size=D, num_layers=2, num_heads=2, seed=0)).eval())


def trainer_output_dir(root):
    """What HF's Trainer and pyreft's train.py leave in a run directory."""
    run = root / "run"
    (run / "checkpoint-5" / "intervenable_model").mkdir(parents=True)
    (run / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (run / "checkpoint-5" / "intervenable_model" / "intkey_x.bin").write_bytes(b"older checkpoint")
    (run / "runs").mkdir()
    (run / "args.json").write_text(json.dumps({"lr": 0.01}))
    (run / "training_args.bin").write_bytes(b"\x80\x04pickled args")
    (run / "eval_results.json").write_text("{}")
    return run


def tree(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def foreign(before, after):
    ours = {"reft_config.json", "adapter.safetensors", "base_model.safetensors", "README.md", "config.json",
            "pytorch_model.bin"}
    keep = lambda t: {k: v for k, v in t.items() if k not in ours and not k.startswith("intkey_")}  # noqa: E731
    return keep(before), keep(after)


def test_save_twice_into_a_trainer_output_directory(tmp_path):
    run = trainer_output_dir(tmp_path)
    before = tree(run)
    first, second = build(1), build(2)
    assert not same(out(first), out(second))
    first.save(run)
    assert same(load_out(run), out(first))
    second.save_pretrained(run)   # saving again replaces our files, keeps the rest
    assert same(load_out(run), out(second))
    old, new = foreign(before, tree(run))
    assert old == new and "checkpoint-5/intervenable_model/intkey_x.bin" in new
    assert not os.path.exists(run / dir_merge.STAGING)
    assert sorted(os.listdir(run)) == ["README.md", "adapter.safetensors", "args.json", "checkpoint-5",
                                       "eval_results.json", "reft_config.json", "runs", "training_args.bin"]


def test_stale_checkpoint_files_of_the_previous_save_are_removed(tmp_path):
    run = trainer_output_dir(tmp_path)
    build(1, trainable_head=True).save(run)
    assert (run / "base_model.safetensors").exists()
    rm = build(2)
    rm.save(run)   # no trainable base parameters now: the old base file would be loaded wrongly
    assert not (run / "base_model.safetensors").exists()
    ck.export_pyreft(rm, run)   # one checkpoint per directory: ours is replaced by the pyreft export
    names = set(os.listdir(run))
    assert "reft_config.json" not in names and "adapter.safetensors" not in names
    assert "config.json" in names and sum(n.startswith("intkey_") for n in names) == 2
    torch.testing.assert_close(load_out(run), out(rm), rtol=1e-5, atol=1e-6)
    assert (run / "args.json").read_text() == json.dumps({"lr": 0.01})


def test_a_foreign_file_with_a_checkpoint_name_is_never_overwritten(tmp_path):
    run = trainer_output_dir(tmp_path)
    rm = build(1)
    rm.model.config.save_pretrained(run)          # a HF model's config.json
    (run / "pytorch_model.bin").write_bytes(b"a HF model's weights")
    before = tree(run)
    with pytest.raises(FileExistsError, match="config.json") as e:
        ck.export_pyreft(rm, run)
    assert "not ReFT checkpoint files" in str(e.value)
    assert tree(run) == before                     # nothing changed, no staging left
    rm.save(run)                                   # our format has other names: fine beside them
    assert (run / "pytorch_model.bin").read_bytes() == b"a HF model's weights"
    assert same(load_out(run), out(rm))


def test_failure_while_staging_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    run = trainer_output_dir(tmp_path)
    old = build(1)
    old.save(run)
    before = tree(run)
    import safetensors.torch

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        build(2).save(run)
    monkeypatch.undo()
    assert tree(run) == before
    assert same(load_out(run), out(old))


def test_killed_while_staging_leaves_the_old_checkpoint(tmp_path):
    """A process killed before the journal exists leaves a partial staging folder: ignored and
    removed by the next load."""
    run = trainer_output_dir(tmp_path)
    old = build(1)
    old.save(run)
    (run / dir_merge.STAGING).mkdir()
    (run / dir_merge.STAGING / "adapter.safetensors").write_bytes(b"half a file")
    assert same(load_out(run), out(old))
    assert not (run / dir_merge.STAGING).exists()


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_crash_while_moving_files_in_is_finished_from_the_journal(tmp_path, monkeypatch, crash_after):
    """A crash after k of the new files were moved in: the journal makes the next load (or
    save) finish the move; the foreign files are never touched, at any point."""
    run = trainer_output_dir(tmp_path)
    build(1, trainable_head=True).save(run)      # so the new save also has a stale file to remove
    before = tree(run)
    new = build(2)
    real, calls = os.replace, []

    def crashing_replace(src, dst):
        if os.path.basename(src) != dir_merge.JOURNAL + ".tmp":
            if len(calls) == crash_after:
                raise KeyboardInterrupt("killed")
            calls.append(src)
        return real(src, dst)
    monkeypatch.setattr(dir_merge.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        new.save(run)
    monkeypatch.undo()
    assert (run / dir_merge.STAGING / dir_merge.JOURNAL).exists()
    old_foreign, mid_foreign = foreign(before, {k: v for k, v in tree(run).items()
                                                if not k.startswith(dir_merge.STAGING)})
    assert old_foreign == mid_foreign
    assert same(load_out(run), out(new))   # the load finished the save first
    assert not (run / dir_merge.STAGING).exists() and not (run / "base_model.safetensors").exists()
    assert foreign(before, tree(run))[1] == old_foreign


def test_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        build(1).save(tmp_path / "f")
