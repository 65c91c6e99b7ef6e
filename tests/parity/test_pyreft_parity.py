"""pyreft 0.1.0 <-> reft_kernels checkpoint parity (run by .ci/pyreft_parity.sh in its own venv).

Both directions, all six intervention classes, tied and untied f+l layouts, a tiny Llama
(abstract components) and a tiny RoBERTa (pyreft's string components):

* pyreft builds and saves (``ReftModel.save``); reft_kernels loads; logits agree to 1e-5 (fp32)
  and Llama greedy generations are identical;
* reft_kernels exports (``export_pyreft``, both key generations); pyreft loads the files into its
  own modules (exact R, exactly pyreft's state-dict keys and dtypes) and, where pyreft's own
  ``ReftModel.load`` works, through it; logits agree to 1e-5.

Skipped when pyreft is not importable (the main environment).
"""
import os

import pytest
import torch

from pyreft_env import require_pyreft  # noqa: E402

pyreft = require_pyreft()
import transformers  # noqa: E402

import reft_kernels as rk
from reft_kernels import checkpoint as ck

torch.set_num_threads(1)  # tiny models: threads only add overhead on a 2-core CI machine
CLASSES = ["LoreftIntervention", "NoreftIntervention", "DireftIntervention",
           "NodireftIntervention", "ConsreftIntervention", "LobireftIntervention"]
D, R, T, B = 64, 4, 8, 2


def tiny_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_roberta(dtype=torch.float32):
    cfg = transformers.RobertaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=100, num_labels=3,
                                     max_position_embeddings=40)
    torch.manual_seed(2)
    return transformers.RobertaForSequenceClassification(cfg).to(dtype).eval()


MODELS = {"llama": (tiny_llama, "block_output"),
          "roberta": (tiny_roberta, "roberta.encoder.layer[%d].output")}


def layout(tied):
    """(layers, LOCS) as pyreft's f2+l2 scripts build them (untied doubles the layer list)."""
    first, last = [0, 1], [T - 2, T - 1]
    if tied:
        return [0, 1], [[first + last] * B] * 2
    return [0, 1, 0, 1], [[first] * B] * 2 + [[last] * B] * 2


def component(model_name, layer):
    comp = MODELS[model_name][1]
    return comp % layer if "%d" in comp else comp


def kwargs_for(cls, i, dtype):
    kw = {"embed_dim": D, "low_rank_dimension": R, "dtype": dtype}
    if cls in ("NoreftIntervention", "NodireftIntervention"):
        kw["add_bias"] = i % 2 == 0
    return kw


@torch.no_grad()
def randomize_pyreft(iv):
    """Random, non-trivial pyreft weights (R is not just ``base[:, :r]``)."""
    for name, p in iv.named_parameters():
        if name.endswith("original"):
            p.add_(0.3 * torch.randn_like(p).tril(-1))
        else:
            p.copy_(torch.randn_like(p) * 0.5)


@torch.no_grad()
def randomize_ours(iv):
    for name, p in iv.named_parameters():
        p.copy_(torch.randn_like(p) * 0.5)


def inputs():
    torch.manual_seed(3)
    return {"input_ids": torch.randint(3, 100, (B, T))}


def pyreft_model(model_name, cls, tied, dtype=torch.float32):
    base = MODELS[model_name][0](dtype)
    layers, locs = layout(tied)
    reps = [{"layer": l, "component": component(model_name, l), "low_rank_dimension": R,
             "intervention": getattr(pyreft, cls)(**kwargs_for(cls, i, dtype))}
            for i, l in enumerate(layers)]
    rm = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=reps))
    for iv in rm.interventions.values():
        iv.eval()  # pyreft leaves intervention dropout in training mode
    return rm, locs


def ours_model(model_name, cls, tied, dtype=torch.float32):
    base = MODELS[model_name][0](dtype)
    layers, locs = layout(tied)
    reps = [{"layer": l, "component": component(model_name, l), "low_rank_dimension": R,
             "intervention": getattr(rk, cls)(**kwargs_for(cls, i, dtype))}
            for i, l in enumerate(layers)]
    rm = rk.get_reft_model(base, rk.ReftConfig(representations=reps))
    rm.eval()
    return rm, locs


def logits(rm, locs):
    with torch.no_grad():
        return rm(inputs(), unit_locations={"sources->base": (None, locs)})[1].logits.float()


def greedy(rm, locs):
    with torch.no_grad():
        return rm.generate(inputs(), unit_locations={"sources->base": (None, locs)},
                           intervene_on_prompt=True, max_new_tokens=5, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[1]


CASES = [(m, c, t) for m in MODELS for c in CLASSES for t in (False, True)]
IDS = [f"{m}-{c[:-12]}-{'tied' if t else 'untied'}" for m, c, t in CASES]


@pytest.mark.parametrize("model_name,cls,tied", CASES, ids=IDS)
def test_pyreft_saved_loads_into_reft_kernels(tmp_path, model_name, cls, tied):
    torch.manual_seed(0)
    prm, locs = pyreft_model(model_name, cls, tied)
    for iv in prm.interventions.values():
        randomize_pyreft(iv)
    expected = logits(prm, locs)
    prm.save(str(tmp_path / "ck"))

    ours = rk.ReftModel.load(str(tmp_path / "ck"), MODELS[model_name][0]())
    ours.eval()
    got = logits(ours, locs)
    assert (got - expected).abs().max().item() <= 1e-5
    assert list(ours.interventions) == list(prm.interventions)
    if model_name == "llama":
        assert torch.equal(greedy(ours, locs), greedy(prm, locs))


EXPORT_CASES = [(m, c, t, "new") for m, c, t in CASES] + \
    [("llama", c, False, "old") for c in CLASSES]  # pyvene <= 0.1.6 dotted keys


@pytest.mark.parametrize("model_name,cls,tied,key_format", EXPORT_CASES,
                         ids=[f"{m}-{c[:-12]}-{'tied' if t else 'untied'}-{k}"
                              for m, c, t, k in EXPORT_CASES])
def test_reft_kernels_export_loads_into_pyreft(tmp_path, model_name, cls, tied, key_format):
    torch.manual_seed(0)
    ours, locs = ours_model(model_name, cls, tied)
    for iv in ours.interventions.values():
        randomize_ours(iv)
    expected = logits(ours, locs)
    out = tmp_path / "py"
    ck.export_pyreft(ours, str(out), key_format=key_format)

    prm, _ = pyreft_model(model_name, cls, tied)
    assert len(os.listdir(out)) == len(prm.interventions) + 1  # + config.json
    old_keys = ck._keys([(r.layer, r.component, r.unit, r.max_number_of_units)
                         for r in ours.config.representations], "old")
    for i, (key, iv) in enumerate(prm.interventions.items()):
        fname = f"intkey_{key if key_format == 'new' else old_keys[i]}.bin"
        sd = torch.load(out / fname, weights_only=True)
        own = iv.state_dict()  # pyreft's own keys, shapes and dtypes
        assert list(sd) == list(own)
        assert {k: (v.shape, v.dtype) for k, v in sd.items()} == \
            {k: (v.shape, v.dtype) for k, v in own.items()}
        iv.load_state_dict(sd)
        if cls in ck.ROTATED:  # pyreft reproduces our R: exactly from LoReFT's slim R, to fp32
            # rounding from our Householder state (its d x d base @ Q vs our compact WY form)
            ours_R = list(ours.interventions.values())[i].rotate_layer.weight.detach()
            err = (iv.rotate_layer.weight.detach().T - ours_R).abs().max().item()
            assert err == 0 if cls == "LoreftIntervention" else err <= 1e-6
    got = logits(prm, locs)
    assert (got - expected).abs().max().item() <= 1e-5
    if model_name == "llama" and key_format == "new":
        assert torch.equal(greedy(prm, locs), greedy(ours, locs))


@pytest.mark.parametrize("cls", ["ConsreftIntervention", "LobireftIntervention", "DireftIntervention"])
def test_pyreft_reftmodel_load_reads_export(tmp_path, cls):
    """pyreft's own static loader (config.json + intkey files) on an fp32 Llama.

    Only these classes: pyreft rebuilds modules with a bf16 learned_source (dtype is not saved),
    which LoReFT/NoReFT/NodiReFT cannot run on fp32 activations, and No/NodiReFT fail to load
    at all (KeyError 'add_bias'), so those go through the module-level test above.
    """
    torch.manual_seed(0)
    ours, locs = ours_model("llama", cls, tied=False)
    for iv in ours.interventions.values():
        randomize_ours(iv)
    with torch.no_grad():  # what pyreft's bf16 learned_source will hold
        for iv in ours.interventions.values():
            if cls == "DireftIntervention":
                for p in iv.learned_source.parameters():
                    p.copy_(p.to(torch.bfloat16))
    expected = logits(ours, locs)
    ck.export_pyreft(ours, str(tmp_path / "py"))
    prm = pyreft.ReftModel.load(str(tmp_path / "py"), tiny_llama())
    for iv in prm.interventions.values():
        iv.eval()
    tol = 1e-5 if cls != "DireftIntervention" else 5e-2  # pyreft runs DiReFT's W h in bf16
    assert (logits(prm, locs) - expected).abs().max().item() <= tol


def test_pyreft_bf16_loreft_roundtrip(tmp_path):
    """bf16 model, pyreft's default dtype: pyreft -> ours -> export -> pyreft.ReftModel.load."""
    torch.manual_seed(0)
    prm, locs = pyreft_model("llama", "LoreftIntervention", False, dtype=torch.bfloat16)
    for iv in prm.interventions.values():
        randomize_pyreft(iv)
    expected = logits(prm, locs)
    prm.save(str(tmp_path / "a"))
    ours = rk.ReftModel.load(str(tmp_path / "a"), tiny_llama(torch.bfloat16))
    for iv in ours.interventions.values():
        assert iv.learned_source.weight.dtype == torch.bfloat16
    ours.eval()
    # our fused op rounds once (fp32 math); pyreft rounds its bf16 Linear output: bf16-level match
    assert (logits(ours, locs) - expected).abs().max().item() <= 0.05
    ck.export_pyreft(ours, str(tmp_path / "b"))
    back = pyreft.ReftModel.load(str(tmp_path / "b"), tiny_llama(torch.bfloat16))
    for iv in back.interventions.values():
        iv.eval()
    for a, b in zip(prm.interventions.values(), back.interventions.values()):
        assert torch.equal(a.learned_source.weight, b.learned_source.weight)
        assert (a.rotate_layer.weight - b.rotate_layer.weight).abs().max().item() <= 1e-6
    assert (logits(back, locs) - expected).abs().max().item() <= 0.05


def test_pyreft_trainer_checkpoint_with_config(tmp_path):
    """``save_intervention`` (trainer checkpoints: no config.json) + act_fn from a user config."""
    torch.manual_seed(0)
    base = tiny_llama()
    reps = [{"layer": l, "component": "block_output", "low_rank_dimension": R,
             "intervention": pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R,
                                                       dtype=torch.float32, act_fn="relu")}
            for l in (0, 1)]
    prm = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=reps))
    for iv in prm.interventions.values():
        randomize_pyreft(iv)
    _, locs = layout(tied=True)
    expected = logits(prm, locs)
    prm.save_intervention(str(tmp_path / "intervenable_model"), include_model=True)
    assert "config.json" not in os.listdir(tmp_path / "intervenable_model")
    cfg = rk.ReftConfig(representations=[
        {"layer": l, "component": "block_output", "low_rank_dimension": R,
         "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R,
                                               dtype=torch.float32, act_fn="relu")}
        for l in (0, 1)])
    ours = rk.ReftModel.load(str(tmp_path / "intervenable_model"), tiny_llama(), config=cfg)
    ours.eval()
    assert (logits(ours, locs) - expected).abs().max().item() <= 1e-5
