"""Checkpoints (reft_kernels.checkpoint): our format, pyreft directories built by hand, errors.

Tiny Llama / RoBERTa from configs (hidden 64, 2 layers); no pyreft needed (the cross-library
checks live in tests/parity and run in their own venv).
"""
import json
import os
import pickle
import re

import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels import checkpoint as ck

D, R, T, B = 64, 4, 7, 2
CLASSES = ["LoreftIntervention", "NoreftIntervention", "DireftIntervention",
           "NodireftIntervention", "ConsreftIntervention", "LobireftIntervention"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(dtype=torch.float32, hidden=D, layers=2):
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_roberta():
    cfg = transformers.RobertaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=100, num_labels=3,
                                     max_position_embeddings=40)
    torch.manual_seed(2)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def make_iv(cls, dtype=torch.float32, i=0, **kw):
    if cls in ("NoreftIntervention", "NodireftIntervention"):
        kw.setdefault("add_bias", i % 2 == 0)
    return getattr(rk, cls)(embed_dim=D, low_rank_dimension=R, dtype=dtype, **kw)


@torch.no_grad()
def randomize(rm):
    for iv in rm.interventions.values():
        for p in iv.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def build(classes, model=None, layers=None, dtype=torch.float32, comp="block_output", **kw):
    model = model if model is not None else tiny_llama(dtype)
    layers = layers or [i % 2 for i in range(len(classes))]
    reps = [{"layer": l, "component": comp % l if "%d" in comp else comp, "low_rank_dimension": R,
             "intervention": make_iv(c, dtype, i, **kw)} for i, (c, l) in enumerate(zip(classes, layers))]
    rm = rk.get_reft_model(model, rk.ReftConfig(representations=reps))
    randomize(rm)
    return rm.eval()


def locs(n):
    return {"sources->base": (None, [[[i % T, (i + 3) % T]] * B for i in range(n)])}


def run(rm):
    torch.manual_seed(3)
    x = torch.randint(3, 100, (B, T))
    with torch.no_grad():
        return rm({"input_ids": x}, unit_locations=locs(len(rm.interventions)))[1].logits


def snapshot(model):
    """Everything a load could change on a model."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()})


def assert_unchanged(model, snap):
    sd, grads, mods = snapshot(model)
    assert grads == snap[1] and mods == snap[2]
    assert sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd)


# ------------------------------------------------------------------------------------------
# our format

@pytest.mark.parametrize("cls", CLASSES)
def test_roundtrip_identical_outputs(tmp_path, cls):
    rm = build([cls, cls])
    expected = run(rm)
    ck.save_reft_model(rm, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["README.md", "adapter.safetensors", "reft_config.json"]
    loaded = ck.load_reft_model(tmp_path / "ck", tiny_llama()).eval()
    assert torch.equal(run(loaded), expected)
    for a, b in zip(rm.interventions.values(), loaded.interventions.values()):
        assert type(a) is type(b) and a.config_kwargs() == b.config_kwargs()


def test_roundtrip_records_everything(tmp_path):
    rm = build(["LoreftIntervention", "NoreftIntervention"], act_fn="relu", dropout=0.1,
               dtype=torch.bfloat16, model=tiny_llama(torch.bfloat16))
    expected = run(rm)
    rm.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "reft_config.json").read_text())
    assert meta["format"] == "reft_kernels" and meta["model"]["class"] == "LlamaForCausalLM"
    e = meta["interventions"][1]
    assert (e["cls"], e["layer"], e["component"], e["embed_dim"], e["rank"], e["dtype"],
            e["dropout"], e["act_fn"], e["add_bias"]) == \
        ("NoreftIntervention", 1, "block_output", D, R, "bfloat16", 0.1, "relu", False)
    assert e["key"] == "layer_1_comp_block_output_unit_pos_nunit_1#0"
    loaded = rk.ReftModel.load(tmp_path / "ck", tiny_llama(torch.bfloat16)).eval()
    assert loaded.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].config_kwargs() == \
        rm.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].config_kwargs()
    assert torch.equal(run(loaded), expected)


def test_roundtrip_roberta_string_components(tmp_path):
    rm = build(["LoreftIntervention", "NodireftIntervention"], model=tiny_roberta(),
               comp="roberta.encoder.layer[%d].output")
    expected = run(rm)
    rm.save(tmp_path / "ck")
    loaded = rk.ReftModel.load(tmp_path / "ck", tiny_roberta()).eval()
    assert list(loaded.interventions) == ["comp_roberta_encoder_layer[0]_output_unit_pos_nunit_1#0",
                                          "comp_roberta_encoder_layer[1]_output_unit_pos_nunit_1#0"]
    assert torch.equal(run(loaded), expected)


def test_trainable_base_parameters_saved_and_restored(tmp_path):
    rm = build(["LoreftIntervention"])
    norm = rm.model.model.norm.weight
    norm.requires_grad_(True)
    with torch.no_grad():
        norm.mul_(1.5)
    expected = run(rm)
    rm.save(tmp_path / "ck")
    assert "base_model.safetensors" in os.listdir(tmp_path / "ck")
    loaded = rk.ReftModel.load(tmp_path / "ck", tiny_llama()).eval()
    assert torch.equal(loaded.model.model.norm.weight, norm) and loaded.model.model.norm.weight.requires_grad
    assert torch.equal(run(loaded), expected)


def test_load_weights_into_existing_model(tmp_path):
    rm = build(["DireftIntervention", "LoreftIntervention"])
    expected = run(rm)
    rm.save(tmp_path / "ck")
    other = build(["DireftIntervention", "LoreftIntervention"], model=tiny_llama())
    randomize(other)
    assert not torch.equal(run(other), expected)
    ck.load_weights(other, tmp_path / "ck")
    assert torch.equal(run(other), expected)


def test_our_format_never_unpickles(tmp_path, monkeypatch):
    rm = build(CLASSES)
    rm.model.model.norm.weight.requires_grad_(True)
    expected = run(rm)
    rm.save(tmp_path / "ck")

    def boom(*a, **k):
        raise AssertionError("unpickling while loading our format")

    model = tiny_llama()
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, boom)
    loaded = ck.load_reft_model(tmp_path / "ck", model).eval()
    monkeypatch.undo()
    assert torch.equal(run(loaded), expected)


def test_atomic_save_keeps_existing_checkpoint(tmp_path, monkeypatch):
    rm = build(["LoreftIntervention"])
    expected = run(rm)
    rm.save(tmp_path / "ck")
    before = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")}
    randomize(rm)

    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        rm.save(tmp_path / "ck")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck"]  # no temp dir left behind
    assert {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")} == before
    assert torch.equal(run(rk.ReftModel.load(tmp_path / "ck", tiny_llama()).eval()), expected)
    rm.save(tmp_path / "ck")  # a successful save replaces it
    assert torch.equal(run(rk.ReftModel.load(tmp_path / "ck", tiny_llama()).eval()), run(rm))


def test_save_into_a_directory_with_other_files_keeps_them(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rm = build(["LoreftIntervention"])
    rm.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "mine")) == ["README.md", "adapter.safetensors", "notes.txt",
                                                     "reft_config.json"]
    assert torch.equal(run(rk.ReftModel.load(tmp_path / "mine", tiny_llama()).eval()), run(rm))


# ------------------------------------------------------------------------------------------
# pyreft directories, written by hand as pyreft 0.1.0 / pyvene 0.1.8 write them

def pyreft_rotation(gen):
    """(original, base, R^T) of torch's orthogonal parametrization, as pyreft's rotate_layer."""
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.empty(D, R))
    torch.nn.init.orthogonal_(holder.weight)
    torch.nn.utils.parametrizations.orthogonal(holder)
    p = holder.parametrizations.weight
    with torch.no_grad():
        p.original.add_(0.3 * torch.randn(D, R, generator=gen).tril(-1))  # a "trained" R
    return p.original.detach().clone(), p[0].base.detach().clone(), holder.weight.detach().clone()


def pyreft_state_dict(cls, gen, add_bias=True, dtype=torch.bfloat16):
    """(state dict exactly as pyreft saves it, the weights as our modules hold them)."""
    rnd = lambda *s: torch.randn(*s, generator=gen) * 0.5  # noqa: E731
    W, b, P, c, v = rnd(R, D).to(dtype), rnd(R).to(dtype), rnd(R, D).to(dtype), rnd(R).to(dtype), rnd(R)
    original, base, Rt = pyreft_rotation(gen)
    if cls == "LoreftIntervention":
        return {"weight": W, "bias": b, "rotate_layer": Rt}, {"R": Rt, "W": W, "b": b}
    sd = {"embed_dim": torch.tensor(D), "interchange_dim": torch.tensor(D)}
    ours = {}
    if cls in ("ConsreftIntervention", "LobireftIntervention"):
        sd = {"learned_source": v, **sd}
        ours["v"] = v
    if cls in ("NoreftIntervention", "NodireftIntervention"):
        sd["proj_layer.weight"] = P
        ours["P"] = P
        if add_bias:
            sd["proj_layer.bias"] = c
            ours["c"] = c
    else:
        sd["rotate_layer.parametrizations.weight.original"] = original
        sd["rotate_layer.parametrizations.weight.0.base"] = base
        ours["R"] = Rt
    if cls not in ("ConsreftIntervention", "LobireftIntervention"):
        sd["learned_source.weight"], sd["learned_source.bias"] = W, b
        ours["W"], ours["b"] = W, b
    return sd, ours


@torch.no_grad()
def set_ours(iv, w):
    if "R" in w:
        iv.rotate_layer.set_weight(w["R"])
    if "P" in w:
        iv.proj_layer.weight.copy_(w["P"])
        if "c" in w:
            iv.proj_layer.bias.copy_(w["c"])
    if "v" in w:
        iv.learned_source.copy_(w["v"])
    if "W" in w:
        iv.learned_source.weight.copy_(w["W"])
        iv.learned_source.bias.copy_(w["b"])


def pyvene_config(classes, layers, comps, keys):
    """config.json as pyvene's IntervenableModel.save writes it (PretrainedConfig diff, sorted)."""
    return {"intervention_constant_sources": [True] * len(classes),
            "intervention_dimensions": [D] * len(classes),
            "intervention_types": [f"<class 'pyreft.interventions.{c}'>" for c in classes],
            "mode": "parallel",
            "representations": [[l, c, "pos", 1, R] + [None] * 9 for l, c in zip(layers, comps)],
            "sorted_keys": keys, "transformers_version": "4.45.1"}


def write_pyreft_dir(path, classes, key_format, dtype, with_config=True, model_bin=None):
    """A pyreft checkpoint directory + the ReftModel (on its own tiny Llama) it must load as."""
    gen = torch.Generator().manual_seed(7)
    layers = [i % 2 for i in range(len(classes))]
    comps = ["block_output"] * len(classes)
    keys = ck._keys([(l, c, "pos", 1) for l, c in zip(layers, comps)], key_format)
    os.makedirs(path)
    ref = build(classes, model=tiny_llama(dtype), dtype=dtype)
    for i, (cls, key, iv) in enumerate(zip(classes, keys, ref.interventions.values())):
        sd, w = pyreft_state_dict(cls, gen, add_bias=i % 2 == 0)
        torch.save(sd, os.path.join(path, f"intkey_{key}.bin"))
        set_ours(iv, w)
    if with_config:
        cfg = pyvene_config(classes, layers, comps,
                            ck._keys([(l, c, "pos", 1) for l, c in zip(layers, comps)], "new"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    if model_bin is not None:
        torch.save(model_bin, os.path.join(path, "pytorch_model.bin"))
        with torch.no_grad():
            for name, v in model_bin.items():
                ref.model.get_parameter(name).copy_(v)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_format", ["new", "old"])
def test_load_hand_written_pyreft_dir(tmp_path, key_format, dtype):
    norm = {"model.norm.weight": torch.linspace(0.5, 1.5, D)}
    ref = write_pyreft_dir(tmp_path / "py", CLASSES, key_format, dtype, model_bin=norm)
    expected = run(ref)
    loaded = ck.load_reft_model(tmp_path / "py", tiny_llama(dtype)).eval()
    assert list(loaded.interventions) == list(ref.interventions)
    for iv in loaded.interventions.values():  # pyreft saves bf16 weights: built in the model dtype
        if hasattr(iv.learned_source, "weight"):
            assert iv.learned_source.weight.dtype == dtype
    assert torch.equal(loaded.model.model.norm.weight, norm["model.norm.weight"].to(dtype))
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 0)


def test_load_pyreft_trainer_checkpoint_needs_config(tmp_path):
    classes = ["LoreftIntervention", "NoreftIntervention"]
    ref = write_pyreft_dir(tmp_path / "intervenable_model", classes, "new", torch.float32,
                           with_config=False)
    with pytest.raises(ck.CheckpointError, match="pass config="):
        ck.load_reft_model(tmp_path / "intervenable_model", tiny_llama())
    cfg = rk.ReftConfig(representations=[
        {"layer": i % 2, "component": "block_output", "intervention": make_iv(c, i=i)}
        for i, c in enumerate(classes)])
    loaded = ck.load_reft_model(tmp_path / "intervenable_model", tiny_llama(), config=cfg).eval()
    assert torch.equal(run(loaded), run(ref))


def test_noreft_add_bias_inferred_from_file(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["NoreftIntervention", "NodireftIntervention"], "new",
                     torch.float32)  # #0 has proj_layer.bias, #1 has none
    loaded = ck.load_reft_model(tmp_path / "py", tiny_llama())
    assert [iv.add_bias for iv in loaded.interventions.values()] == [True, False]


def test_rotation_helpers_are_exact():
    gen = torch.Generator().manual_seed(0)
    original, base, Rt = pyreft_rotation(gen)
    assert torch.equal(ck.rotation_from_pyreft(original, base), Rt.T)
    rng = torch.get_rng_state()
    o2, b2 = ck.rotation_to_pyreft(Rt.T)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert o2.shape == (D, R) and b2.shape == (D, D) and o2.dtype == b2.dtype == torch.float32
    assert torch.equal(ck.rotation_from_pyreft(o2, b2), Rt.T)
    torch.testing.assert_close(b2.T @ b2, torch.eye(D), atol=1e-5, rtol=0)


def test_export_pyreft_layout(tmp_path):
    rm = build(["LoreftIntervention", "ConsreftIntervention", "NoreftIntervention"])
    ck.export_pyreft(rm, tmp_path / "new")
    ck.export_pyreft(rm, tmp_path / "old", key_format="old")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert set(cfg) == {"intervention_constant_sources", "intervention_dimensions",
                        "intervention_types", "mode", "representations", "sorted_keys",
                        "transformers_version"}
    assert cfg["representations"][2] == [0, "block_output", "pos", 1, R] + [None] * 9
    assert cfg["intervention_types"][1] == "<class 'pyreft.interventions.ConsreftIntervention'>"
    assert sorted(os.listdir(tmp_path / "old")) == [
        "config.json", "intkey_layer.0.comp.block_output.unit.pos.nunit.1#0.bin",
        "intkey_layer.0.comp.block_output.unit.pos.nunit.1#1.bin",
        "intkey_layer.1.comp.block_output.unit.pos.nunit.1#0.bin"]
    lo = torch.load(tmp_path / "new" / "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin")
    assert {k: (tuple(v.shape), v.dtype) for k, v in lo.items()} == {
        "weight": ((R, D), torch.float32), "bias": ((R,), torch.float32),
        "rotate_layer": ((D, R), torch.float32)}
    co = torch.load(tmp_path / "new" / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin")
    assert list(co) == ["learned_source", "embed_dim", "interchange_dim",
                        "rotate_layer.parametrizations.weight.original",
                        "rotate_layer.parametrizations.weight.0.base"]
    assert co["embed_dim"].dtype == torch.int64 and co["embed_dim"].dim() == 0
    expected = run(rm)
    for d in ("new", "old"):  # both read back (R is re-set to fp32 rounding: not bit-exact)
        got = run(ck.load_reft_model(tmp_path / d, tiny_llama()).eval())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# bad input: clear errors, model untouched

def check_fails(path, model, match, **kw):
    snap = snapshot(model)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_reft_model(path, model, **kw)
    assert_unchanged(model, snap)


def test_embed_dim_mismatch(tmp_path):
    build(["LoreftIntervention", "DireftIntervention"]).save(tmp_path / "ck")
    check_fails(tmp_path / "ck", tiny_llama(hidden=32),
                r"'layer_0_comp_block_output_unit_pos_nunit_1#0'.*embed_dim expected 32.*found 64")


def test_layer_count_mismatch(tmp_path):
    build(["LoreftIntervention", "LoreftIntervention"]).save(tmp_path / "ck")
    check_fails(tmp_path / "ck", tiny_llama(layers=1), r"layer_1_comp.*layer=1 is out of range")


def test_rank_mismatch_with_config(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["LoreftIntervention"], "new", torch.float32)
    cfg_file = tmp_path / "py" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["representations"][0][4] = 8
    cfg_file.write_text(json.dumps(cfg))
    check_fails(tmp_path / "py", tiny_llama(), r"#0'.*rank.*expected 8.*found 4")
    user = rk.ReftConfig(representations=[{"layer": 0, "component": "block_output", "intervention":
                                           rk.LoreftIntervention(embed_dim=D, low_rank_dimension=2)}])
    check_fails(tmp_path / "py", tiny_llama(), r"#0.*rank.*expected 2 from the config, found 4",
                config=user)


def test_bad_base_parameters_leave_model_unchanged(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["LoreftIntervention"], "new", torch.float32,
                     model_bin={"model.norm.weight": torch.ones(D)})
    torch.save({"model.norm.weight": torch.ones(D + 1)}, tmp_path / "py" / "pytorch_model.bin")
    check_fails(tmp_path / "py", tiny_llama(), r"'model.norm.weight' expected shape \(64,\), found \(65,\)")
    torch.save({"model.nope": torch.ones(D)}, tmp_path / "py" / "pytorch_model.bin")
    check_fails(tmp_path / "py", tiny_llama(), r"'model.nope' does not exist")


def test_missing_and_corrupt_files(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["LoreftIntervention", "LoreftIntervention"], "new", torch.float32)
    victim = tmp_path / "py" / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"
    os.remove(victim)
    check_fails(tmp_path / "py", tiny_llama(), r"no weights file for intervention 'layer_1_comp")
    victim.write_bytes(b"not a torch file")
    check_fails(tmp_path / "py", tiny_llama(), r"cannot read .*intkey_layer_1")
    torch.save({"weight": torch.zeros(R, D), "bias": torch.zeros(R)}, victim)
    check_fails(tmp_path / "py", tiny_llama(), r"needs tensors \['rotate_layer.weight'\]")


def test_hub_repo_id_and_missing_directory(tmp_path, monkeypatch):
    rm = build(["LoreftIntervention"])
    rm.save(tmp_path / "ck")
    import huggingface_hub

    calls = []

    def fake_download(repo_id, local_dir=None):
        calls.append((repo_id, local_dir))
        return str(tmp_path / "ck")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = rk.ReftModel.load("someone/reft-demo", tiny_llama()).eval()
    assert calls == [("someone/reft-demo", None)]
    assert torch.equal(run(loaded), run(rm))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_reft_model(tmp_path / "nope", tiny_llama())


# ------------------------------------------------------------------------------------------
# corrupt files and non-finite weights: a CheckpointError naming the file, what is wrong, the fix

FIX = "save the checkpoint again|export the checkpoint again|copy it again"


def saved(tmp_path, classes=("LoreftIntervention", "NoreftIntervention"), trainable_norm=False):
    rm = build(list(classes))
    if trainable_norm:
        rm.model.model.norm.weight.requires_grad_(True)
    rm.save(tmp_path / "ck")
    return tmp_path / "ck"


def edit_config(path, fn):
    cfg_file = path / "reft_config.json"
    meta = json.loads(cfg_file.read_text())
    fn(meta)
    cfg_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("text,what", [
    ('{"format": "reft_kernels", "interventions": [', r"is not valid JSON \(.*; line 1, column"),
    ("", r"is not valid JSON"),
    ("[1, 2]", r"holds a JSON list, expected an object"),
])
def test_corrupt_config_json(tmp_path, text, what):
    ck_dir = saved(tmp_path)
    (ck_dir / "reft_config.json").write_text(text)
    check_fails(ck_dir, tiny_llama(), rf"{tmp_path}/ck/reft_config.json {what}.*({FIX})")


def test_config_json_with_bad_bytes(tmp_path):
    ck_dir = saved(tmp_path)
    (ck_dir / "reft_config.json").write_bytes(b'{"format": "\xff\xfe"}')
    check_fails(ck_dir, tiny_llama(), r"reft_config.json is not UTF-8 text.*copy it again")


@pytest.mark.parametrize("edit,what", [
    (lambda m: m.pop("format"), r"has no 'format' field"),
    (lambda m: m.pop("interventions"), r"field 'interventions' must be a non-empty list"),
    (lambda m: m.update(interventions=[]), r"field 'interventions' must be a non-empty list"),
    (lambda m: m.update(model="Llama"), r"field 'model' must be a JSON object"),
    (lambda m: m["interventions"][1].pop("cls"), r"interventions\[1\] lacks the required fields \['cls'\]"),
    (lambda m: m["interventions"][0].pop("key"), r"interventions\[0\] lacks the required fields \['key'\]"),
    (lambda m: m["interventions"][0].update(layer="1"), r"interventions\[0\]: field 'layer' = '1' should be an integer or null"),
    (lambda m: m["interventions"][0].update(rank=True), r"interventions\[0\]: field 'rank' = True should be an integer or null"),
    (lambda m: m["interventions"][0].update(cls="FooIntervention"), r"interventions\[0\]: intervention type 'FooIntervention' is not supported"),
    (lambda m: m["interventions"][0].update(dtype="float33"), r"interventions\[0\]: dtype='float33' is not a torch dtype"),
    (lambda m: m["interventions"].__setitem__(0, "oops"), r"interventions\[0\] must be a JSON object"),
])
def test_config_json_missing_or_bad_fields(tmp_path, edit, what):
    ck_dir = saved(tmp_path)
    edit_config(ck_dir, edit)
    check_fails(ck_dir, tiny_llama(), rf"{tmp_path}/ck/reft_config.json:? {what}.*(edited by hand|upgrade)")


def test_newer_format_version_says_upgrade(tmp_path):
    ck_dir = saved(tmp_path)
    edit_config(ck_dir, lambda m: m.update(format_version=99))
    check_fails(ck_dir, tiny_llama(), r"reft_config.json: format 'reft_kernels' version 99 .*upgrade reft_kernels")


@pytest.mark.parametrize("name", ["adapter.safetensors", "base_model.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove"])
def test_truncated_or_corrupt_safetensors(tmp_path, name, damage):
    ck_dir = saved(tmp_path, trainable_norm=True)
    f = ck_dir / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
        what = rf"{f} is not a readable safetensors file \(.*\); the file is corrupt or truncated.*copy it again"
    elif damage == "garbage":
        f.write_bytes(b"\x00" * 7)
        what = rf"{f} is not a readable safetensors file"
    else:
        os.remove(f)
        if name == "base_model.safetensors":  # optional file: loads without it (nothing to check)
            ck.load_reft_model(ck_dir, tiny_llama())
            return
        what = rf"{f} is missing; the checkpoint directory is incomplete.*save it again"
    check_fails(ck_dir, tiny_llama(), what)


def test_corrupt_pyreft_files_name_the_file(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["LoreftIntervention"], "new", torch.float32)
    victim = tmp_path / "py" / "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    check_fails(tmp_path / "py", tiny_llama(), rf"cannot read {victim} as a pyreft weights file.*copy it again")
    torch.save([torch.zeros(3)], victim)
    check_fails(tmp_path / "py", tiny_llama(), r"intkey_layer_0.*holds a list, expected a state dict")
    victim.write_bytes(good)
    cfg = tmp_path / "py" / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    check_fails(tmp_path / "py", tiny_llama(), rf"{cfg} is not valid JSON.*copy it again")
    for broken, what in (({"representations": []}, "'representations' must be a non-empty list"),
                         ({**json.loads(text), "intervention_types": None}, "'intervention_types' must give one class"),
                         ({**json.loads(text), "representations": [["x", "block_output"]]}, "cannot read the representations"),
                         ({**json.loads(text), "sorted_keys": "k"}, "'sorted_keys' must list one key")):
        cfg.write_text(json.dumps(broken))
        check_fails(tmp_path / "py", tiny_llama(), rf"{cfg}: .*{what}.*export the checkpoint again")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    ck_dir = saved(tmp_path, trainable_norm=True)
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0.proj_layer.weight"
    flat = load_file(ck_dir / "adapter.safetensors")
    flat[key][1, 2] = bad
    save_file(flat, ck_dir / "adapter.safetensors")
    kind = "NaN" if bad != bad else "Inf"
    check_fails(ck_dir, tiny_llama(), rf"{ck_dir}/adapter.safetensors: tensor '{re.escape(key)}' holds 1 "
                                      rf"non-finite values \({kind}\) of {R * D}")
    other = build(["LoreftIntervention", "NoreftIntervention"])  # load_weights refuses too
    snap = snapshot(other)
    with pytest.raises(ck.CheckpointError, match="non-finite"):
        ck.load_weights(other, ck_dir)
    assert_unchanged(other, snap)
    # the base-model file is checked as well
    flat[key][1, 2] = 0.0
    save_file(flat, ck_dir / "adapter.safetensors")
    base = load_file(ck_dir / "base_model.safetensors")
    base["model.norm.weight"][3] = bad
    save_file(base, ck_dir / "base_model.safetensors")
    check_fails(ck_dir, tiny_llama(), r"base_model.safetensors: tensor 'model.norm.weight' holds 1 non-finite")


def test_non_finite_pyreft_weights_are_refused(tmp_path):
    write_pyreft_dir(tmp_path / "py", ["LoreftIntervention", "DireftIntervention"], "new", torch.bfloat16,
                     model_bin={"model.norm.weight": torch.ones(D)})
    victim = tmp_path / "py" / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"
    sd = torch.load(victim, weights_only=True)
    sd["rotate_layer.parametrizations.weight.original"][0, 0] = float("nan")
    torch.save(sd, victim)
    check_fails(tmp_path / "py", tiny_llama(torch.bfloat16),
                rf"{re.escape(str(victim))}: tensor 'rotate_layer.parametrizations.weight.original' holds 1 "
                r"non-finite values \(NaN\).*Load an earlier checkpoint")
    os.remove(victim)
    write_pyreft_dir(tmp_path / "py2", ["LoreftIntervention"], "new", torch.float32,
                     model_bin={"model.norm.weight": torch.full((D,), float("inf"))})
    check_fails(tmp_path / "py2", tiny_llama(), r"pytorch_model.bin: tensor 'model.norm.weight' holds 64 non-finite")


def test_read_for_model_returns_plain_pieces_and_wrap_is_passed_in(tmp_path):
    """The checkpoint code builds no ReftModel itself: read_for_model leaves the model untouched,
    and load_reft_model wraps with whatever ``wrap`` it is given (default get_reft_model)."""
    rm = build(["LoreftIntervention", "NodireftIntervention"])
    rm.model.model.norm.weight.requires_grad_(True)
    expected = run(rm)
    rm.save(tmp_path / "ck")
    model = tiny_llama()
    snap = snapshot(model)
    loaded = ck.read_for_model(tmp_path / "ck", model)
    assert_unchanged(model, snap)
    assert isinstance(loaded.config, rk.ReftConfig) and loaded.format == "reft_kernels"
    assert sorted(loaded.base_state) == ["model.norm.weight"]
    wrapped = rk.get_reft_model(model, loaded.config)
    ck.load_base_state(wrapped.model, loaded.base_state)
    assert torch.equal(run(wrapped.eval()), expected)

    calls = []

    def wrap(model, config, **kwargs):
        calls.append(kwargs)
        return rk.get_reft_model(model, config, **kwargs)

    again = ck.load_reft_model(tmp_path / "ck", tiny_llama(), wrap=wrap, backend="torch")
    assert calls == [{"backend": "torch"}] and again.backend == "torch"
    # another op backend: same math, not the same rounding
    torch.testing.assert_close(run(again.eval()), expected, atol=1e-5, rtol=0)
