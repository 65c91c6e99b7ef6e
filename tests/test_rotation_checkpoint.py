"""Checkpoints keep the rotation's parametrisation: bit-exact resume for both maps, pyreft's d x d
base kept when loaded from pyreft's full state, and checkpoints written before the Householder
default (``rotate_layer.basis``) still load. No pyreft needed (tests/parity has the cross-library
checks)."""
import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels import checkpoint as ck

D, R, T = 64, 4, 7
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "torch")


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(cfg).eval()


def reft(cls="DireftIntervention", **kw):
    iv = getattr(rk, cls)(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, **kw)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    config = rk.ReftConfig(representations=[{"layer": 1, "component": "block_output",
                                             "low_rank_dimension": R, "intervention": iv}])
    return rk.get_reft_model(tiny_llama(), config).eval()


def logits(rm):
    torch.manual_seed(3)
    x = torch.randint(3, 100, (2, T))
    with torch.no_grad():
        return rm({"input_ids": x}, unit_locations={"sources->base": (None, [[[1, 5]] * 2])})[1].logits


def only(rm):
    return next(iter(rm.interventions.values()))


def pyreft_full_rotation():
    """A "trained" pyreft rotation: (original with random tails, an orthogonal d x d base)."""
    original = 0.3 * torch.randn(D, R).tril(-1)
    original.diagonal().fill_(-1.0)
    base, _ = torch.linalg.qr(torch.randn(D, D))
    return original, base


@pytest.mark.parametrize("orthogonal_map", ["householder", "cholesky_qr"])
def test_our_format_resumes_bit_exactly(tmp_path, orthogonal_map):
    rm = reft(orthogonal_map=orthogonal_map)
    rm.save(str(tmp_path / "ck"))
    back = rk.ReftModel.load(str(tmp_path / "ck"), tiny_llama())
    a, b = only(rm).rotate_layer, only(back).rotate_layer
    assert b.orthogonal_map == orthogonal_map
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.equal(logits(rm), logits(back))


def test_pyreft_full_base_is_kept_through_our_format(tmp_path):
    rm = reft("ConsreftIntervention")
    original, base = pyreft_full_rotation()
    only(rm).rotate_layer.load_state_dict({"parametrizations.weight.original": original,
                                           "parametrizations.weight.0.base": base})
    rm.save(str(tmp_path / "ck"))
    back = rk.ReftModel.load(str(tmp_path / "ck"), tiny_llama())
    assert torch.equal(only(back).rotate_layer.base, base)
    assert torch.equal(only(back).rotate_layer.reflectors, original.tril(-1))
    # and export gives pyreft its state verbatim (so pyreft continues the same trajectory)
    ck.export_pyreft(back, str(tmp_path / "py"))
    key = rm.config.keys[0] if hasattr(rm.config, "keys") else None
    sd = torch.load(tmp_path / "py" / f"intkey_{key}.bin", weights_only=True)
    assert torch.equal(sd["rotate_layer.parametrizations.weight.0.base"], base)
    assert torch.equal(sd["rotate_layer.parametrizations.weight.original"], original)
    assert list(sd) == list(only(back).pyreft_state_dict())


def test_checkpoint_with_old_basis_still_loads(tmp_path):
    """Before the Householder default our format stored ``rotate_layer.basis`` (Cholesky-QR):
    such a checkpoint loads as Cholesky-QR (exact resume), and into a default-map config by
    conversion (R kept to fp32 rounding)."""
    old = reft("LoreftIntervention", orthogonal_map="cholesky_qr")
    old.save(str(tmp_path / "old"))
    names = {k for k in ck.read_checkpoint(str(tmp_path / "old"))[3][0]}
    assert names == {"rotate_layer.weight", "rotate_layer.basis", "learned_source.weight",
                     "learned_source.bias"}                           # exactly the old tensor set
    same = rk.ReftModel.load(str(tmp_path / "old"), tiny_llama())
    assert torch.equal(logits(same), logits(old))
    config = rk.ReftConfig(representations=[{
        "layer": 1, "component": "block_output", "low_rank_dimension": R,
        "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)}])
    converted = rk.ReftModel.load(str(tmp_path / "old"), tiny_llama(), config=config)
    assert only(converted).rotate_layer.orthogonal_map == "householder"
    torch.testing.assert_close(only(converted).rotate_layer.weight, only(old).rotate_layer.weight,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(converted), logits(old), atol=1e-5, rtol=0)


def test_rank_deficient_basis_in_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    old = reft("LoreftIntervention", orthogonal_map="cholesky_qr")
    old.save(str(tmp_path / "bad"))
    path = tmp_path / "bad" / ck.WEIGHTS_NAME
    flat = load_file(str(path))
    name = next(k for k in flat if k.endswith("rotate_layer.basis"))
    flat[name][1] = flat[name][0]                                     # two equal rows: rank 3
    save_file(flat, str(path), metadata={"format": ck.FORMAT})
    with pytest.raises(ck.CheckpointError, match="rotate_layer.basis is rank-deficient"):
        rk.ReftModel.load(str(tmp_path / "bad"), tiny_llama())
    with torch.no_grad():                                             # and in memory, on access
        only(old).rotate_layer.basis.zero_()
    with pytest.raises(ValueError, match="rank-deficient"):
        logits(old)


def test_checkpoint_loads_build_rotations_without_the_rng_parity_draw():
    """Construction draws pyreft's (d, d - r) completion for RNG parity; a checkpoint load, which
    overwrites the weights at once, skips it (no d x (d - r) temporary per loaded adapter)."""
    from reft_kernels.interventions.rotation import OrthonormalRotation, without_rng_parity_draw
    torch.manual_seed(0)
    OrthonormalRotation(64, 4)
    after_parity = torch.rand(3)
    torch.manual_seed(0)
    torch.nn.init.orthogonal_(torch.empty(64, 4))
    after_init_only = torch.rand(3)
    with without_rng_parity_draw():
        torch.manual_seed(0)
        OrthonormalRotation(64, 4)
        skipped = torch.rand(3)
    assert torch.equal(skipped, after_init_only) and not torch.equal(skipped, after_parity)
    torch.manual_seed(0)
    OrthonormalRotation(64, 4)
    assert torch.equal(torch.rand(3), after_parity)          # the default is unchanged after the block
