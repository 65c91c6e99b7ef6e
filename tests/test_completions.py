"""The rotation base's completion (``completion=``: compact | hartley | pyreft): same initial R and
RNG stream, different trajectories, exact export to pyreft, and checkpoints that keep their kind
(files from before the option load as compact, with the same outputs). No pyreft needed."""
import json
import os
import shutil

import pytest
import torch

import reft_kernels as rk
from reft_kernels.interventions.completions import COMPLETIONS, hartley_factors, hartley_mix
from reft_kernels.compat.pyreft.rotation import rotation_from_pyreft
from reft_kernels.interventions.rotation import OrthonormalRotation

from test_rotation_checkpoint import D, R, T, _torch_backend, tiny_llama  # noqa: F401 (autouse fixture)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "loreft_compact_before_completion")
KINDS_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "completions_saved_with_compact_default")
pytestmark = pytest.mark.usefixtures("one_thread")


def logits(rm, x):
    with torch.no_grad():
        return rm({"input_ids": x}, unit_locations={"sources->base": (None, [[[1, 5]] * 2])})[1].logits


def only(rm):
    return next(iter(rm.interventions.values()))


@pytest.mark.parametrize("m", [1, 2, 37, 64])
def test_hartley_mix_is_an_orthogonal_spreading_transform(m):
    signs, perm = hartley_factors(m, 1234)
    S = hartley_mix(torch.eye(m, dtype=torch.float64), signs, perm)
    torch.testing.assert_close(S.T @ S, torch.eye(m, dtype=torch.float64))
    assert S.abs().max() <= (2.0 / m) ** 0.5 + 1e-12          # every column spread over all axes
    again = hartley_mix(torch.eye(m, dtype=torch.float64), *hartley_factors(m, 1234))
    assert torch.equal(S, again)                               # regenerated from the seed


def test_completions_share_the_initial_r_and_the_rng_stream_but_not_the_gradient():
    weights, after, grads = {}, {}, {}
    x = torch.randn(D, generator=torch.Generator().manual_seed(5))
    for c in COMPLETIONS:
        torch.manual_seed(0)
        rot = OrthonormalRotation(D, R, completion=c)
        after[c] = torch.rand(3)                               # what learned_source would draw
        assert rot.completion == c
        weights[c] = rot.weight.detach()
        (rot.weight @ x).square().sum().backward()
        grads[c] = rot.reflectors.grad.tril(-1)
    for c in COMPLETIONS:
        torch.testing.assert_close(weights[c], weights["compact"], atol=1e-6, rtol=0)
        assert torch.equal(after[c], after["compact"])
    # rows < r rotate within R's span (the same for all); rows >= r follow the completion
    torch.testing.assert_close(grads["hartley"][:R], grads["compact"][:R], atol=1e-5, rtol=1e-5)
    for a, b in (("hartley", "compact"), ("pyreft", "compact"), ("hartley", "pyreft")):
        assert not torch.allclose(grads[a][R:], grads[b][R:], atol=1e-3)


def test_pyreft_base_flag_is_the_pyreft_completion_and_contradictions_raise():
    torch.manual_seed(0)
    a = OrthonormalRotation(D, R, pyreft_base=True)
    torch.manual_seed(0)
    b = OrthonormalRotation(D, R, completion="pyreft")
    torch.manual_seed(0)
    c = OrthonormalRotation(D, R)                              # the default (issue 20)
    assert a.completion == b.completion == c.completion == "pyreft"
    assert torch.equal(a.base, b.base) and torch.equal(a.base, c.base)
    assert (a.pyreft_base, b.pyreft_base, c.pyreft_base) == (True, False, False)   # data order: a only
    assert OrthonormalRotation(D, R, pyreft_base=False).completion == "compact"
    with pytest.raises(ValueError, match="completion='nope' is unknown"):
        OrthonormalRotation(D, R, completion="nope")
    with pytest.raises(ValueError, match="pyreft_base=True contradicts completion='hartley'"):
        OrthonormalRotation(D, R, completion="hartley", pyreft_base=True)
    with pytest.raises(ValueError, match="pyreft_base=False contradicts completion='pyreft'"):
        OrthonormalRotation(D, R, completion="pyreft", pyreft_base=False)
    with pytest.raises(ValueError, match="orthogonal_map='householder'"):
        OrthonormalRotation(D, R, orthogonal_map="cholesky_qr", completion="hartley")


def test_hartley_exports_pyreft_state_on_the_same_trajectory():
    torch.manual_seed(0)
    rot = OrthonormalRotation(D, R, completion="hartley")
    with torch.no_grad():
        rot.reflectors.add_(0.2 * torch.randn(D, R))
    original, base = rot.pyreft_state()
    torch.testing.assert_close(base.T @ base, torch.eye(D), atol=2e-6, rtol=0)
    torch.testing.assert_close(rotation_from_pyreft(original, base), rot.weight, atol=2e-6, rtol=0)
    # pyreft's parametrisation from that state gives the same gradient (same trajectory)
    loaded = OrthonormalRotation(D, R, completion="compact")
    loaded.load_state_dict({"parametrizations.weight.original": original,
                            "parametrizations.weight.0.base": base})
    x = torch.randn(D)
    for m in (rot, loaded):
        (m.weight @ x).square().sum().backward()
    torch.testing.assert_close(loaded.reflectors.grad.tril(-1), rot.reflectors.grad.tril(-1),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_checkpoints_keep_the_completion(tmp_path, completion):
    torch.manual_seed(0)
    iv = rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, completion=completion)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    config = rk.ReftConfig(representations=[{"layer": 1, "component": "block_output",
                                             "low_rank_dimension": R, "intervention": iv}])
    rm = rk.get_reft_model(tiny_llama(), config).eval()
    rm.save(str(tmp_path / "ck"))
    meta = json.loads((tmp_path / "ck" / "reft_config.json").read_text())
    assert meta["interventions"][0]["completion"] == completion
    back = rk.ReftModel.load(str(tmp_path / "ck"), tiny_llama())
    a, b = only(rm).rotate_layer, only(back).rotate_layer
    assert b.completion == completion
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x = torch.randint(3, 100, (2, T), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(rm, x), logits(back, x))


@pytest.mark.parametrize("into", [None, "hartley", "pyreft"])
def test_checkpoint_from_before_the_option_loads_as_compact_with_its_outputs(tmp_path, into):
    """tests/data/loreft_compact_before_completion was saved by the code before ``completion=``
    (no field in reft_config.json, no seed): it loads as compact, whatever the default or the
    config's module, and gives the logits it gave then."""
    expected = torch.load(os.path.join(FIXTURE, "expected_logits.pt"), weights_only=True)
    meta = json.load(open(os.path.join(FIXTURE, "reft_config.json")))
    assert "completion" not in meta["interventions"][0]
    path = str(tmp_path / "old")
    shutil.copytree(FIXTURE, path)
    config = None
    if into is not None:
        config = rk.ReftConfig(representations=[{
            "layer": 1, "component": "block_output", "low_rank_dimension": R,
            "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32,
                                                  completion=into)}])
    back = rk.ReftModel.load(path, tiny_llama(), config=config)
    assert only(back).rotate_layer.completion == "compact"
    torch.testing.assert_close(logits(back, expected["input_ids"]), expected["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("into", [None, "default", "compact"])
@pytest.mark.parametrize("kind", COMPLETIONS)
def test_checkpoints_from_before_the_default_switch_keep_their_kind_and_outputs(tmp_path, kind, into):
    """tests/data/completions_saved_with_compact_default/<kind> were saved when the default was
    "compact": each loads as its own kind (the state decides, not today's default or the
    config's module) and gives the logits it gave then."""
    src = os.path.join(KINDS_FIXTURE, kind)
    expected = torch.load(os.path.join(src, "expected_logits.pt"), weights_only=True)
    path = str(tmp_path / kind)
    shutil.copytree(src, path)
    config = None
    if into is not None:
        kw = {} if into == "default" else {"completion": into}
        config = rk.ReftConfig(representations=[{
            "layer": 1, "component": "block_output", "low_rank_dimension": R,
            "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, **kw)}])
    back = rk.ReftModel.load(path, tiny_llama(), config=config)
    assert only(back).rotate_layer.completion == kind
    assert (only(back).rotate_layer.base is not None) == (kind == "pyreft")
    torch.testing.assert_close(logits(back, expected["input_ids"]), expected["logits"], atol=1e-5, rtol=0)


def test_default_is_pyreft_and_saves_its_base(tmp_path):
    """The default completion is pyreft's (issue 20): a default LoReFT's checkpoint holds the
    d x d base (d*d*4 bytes), a compact one only the d x r reflectors; both reload exactly."""
    sizes = {}
    for kind, kw in (("pyreft", {}), ("compact", {"completion": "compact"})):
        torch.manual_seed(0)
        iv = rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, **kw)
        assert iv.rotate_layer.completion == kind
        config = rk.ReftConfig(representations=[{"layer": 1, "component": "block_output",
                                                 "low_rank_dimension": R, "intervention": iv}])
        rm = rk.get_reft_model(tiny_llama(), config).eval()
        rm.save(str(tmp_path / kind))
        sizes[kind] = os.path.getsize(tmp_path / kind / "adapter.safetensors")
        back = rk.ReftModel.load(str(tmp_path / kind), tiny_llama())
        x = torch.randint(3, 100, (2, T), generator=torch.Generator().manual_seed(3))
        assert only(back).rotate_layer.completion == kind and torch.equal(logits(rm, x), logits(back, x))
    assert sizes["pyreft"] - sizes["compact"] >= D * D * 4


def test_hartley_intervention_exports_to_pyreft_keys_with_its_trajectory():
    torch.manual_seed(0)
    iv = rk.DireftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, completion="hartley")
    with torch.no_grad():
        iv.rotate_layer.reflectors.add_(0.2 * torch.randn(D, R))
    back = rk.DireftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    back.load_state_dict(iv.pyreft_state_dict())
    assert back.rotate_layer.completion == "pyreft"
    torch.testing.assert_close(back.rotate_layer.weight, iv.rotate_layer.weight, atol=2e-6, rtol=0)
    x = torch.randn(D)
    for m in (iv, back):
        (m.rotate_layer.weight @ x).square().sum().backward()
    torch.testing.assert_close(back.rotate_layer.reflectors.grad.tril(-1),
                               iv.rotate_layer.reflectors.grad.tril(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_full_rank_rotation_has_nothing_to_complete(completion):
    """r = d: the completion draw is empty (d x 0); every kind builds an orthogonal d x d R, trains,
    and equals the compact one (there is no column left to complete)."""
    d = 8
    rots = {}
    for kind in (completion, "compact"):
        torch.manual_seed(3)
        rots[kind] = OrthonormalRotation(d, d, completion=kind)
    w = rots[completion].weight
    assert torch.allclose(w @ w.T, torch.eye(d), atol=1e-5)
    assert torch.allclose(w, rots["compact"].weight, atol=1e-6)
    (w.sum() * 2).backward()
    assert rots[completion].reflectors.grad is not None
