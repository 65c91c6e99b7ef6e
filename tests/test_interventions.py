"""Intervention modules: pyreft's math, attribute layout, init RNG parity, the rotation, config."""
import json

import pytest
import torch

import reft_kernels as pyreft
from reft_kernels.config import ReftConfig
from reft_kernels.interventions import INTERVENTION_CLASSES, OrthonormalRotation, intervention_class

D, R = 32, 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """These tests are about the modules, not the kernels: use the plain torch backend."""
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "torch")


CLASSES = [pyreft.LoreftIntervention, pyreft.NoreftIntervention, pyreft.DireftIntervention,
           pyreft.NodireftIntervention, pyreft.ConsreftIntervention, pyreft.LobireftIntervention]


def pyreft_formula(iv, base):
    """pyreft 0.1.0's forward, transcribed (its rotate_layer.weight is our R transposed)."""
    act = {None: lambda x: x, "relu": torch.relu}[iv.act_fn]
    name = type(iv).__name__
    if name in ("NoreftIntervention", "NodireftIntervention"):
        proj = iv.proj_layer.weight.float()
        src = act(base @ iv.learned_source.weight.float().t() + iv.learned_source.bias.float())
        if name == "NodireftIntervention":
            return base + src @ proj
        pb = base @ proj.t() + (iv.proj_layer.bias.float() if iv.proj_layer.bias is not None else 0)
        return base + (src - pb) @ proj
    rot = iv.rotate_layer.weight.t()                   # (d, r) as in pyreft
    if name == "ConsreftIntervention":
        return base + (iv.learned_source - base @ rot) @ rot.t()
    if name == "LobireftIntervention":
        return base + iv.learned_source @ rot.t()
    src = act(base @ iv.learned_source.weight.float().t() + iv.learned_source.bias.float())
    if name == "DireftIntervention":
        return base + src @ rot.t()
    return base + (src - base @ rot) @ rot.t()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("act_fn", [None, "relu"])
def test_forward_matches_pyreft_formula(cls, act_fn):
    iv = cls(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, act_fn=act_fn, add_bias=True)
    base = torch.randn(3, 5, D)
    torch.testing.assert_close(iv(base), pyreft_formula(iv, base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_attribute_layout_and_dtypes(cls):
    iv = cls(embed_dim=D, low_rank_dimension=R, add_bias=False, device="ignored", layer=3)
    if cls in (pyreft.ConsreftIntervention, pyreft.LobireftIntervention):
        assert isinstance(iv.learned_source, torch.nn.Parameter)
        assert iv.learned_source.shape == (R,) and iv.learned_source.dtype == torch.float32
    else:
        assert isinstance(iv.learned_source, torch.nn.Linear)
        assert iv.learned_source.weight.dtype == torch.bfloat16           # pyreft's default dtype
    if cls in (pyreft.NoreftIntervention, pyreft.NodireftIntervention):
        assert iv.proj_layer.weight.shape == (R, D) and iv.proj_layer.bias is None
        assert not hasattr(iv, "rotate_layer")
    else:
        rot = iv.rotate_layer.weight
        assert rot.shape == (R, D) and rot.dtype == torch.float32
        torch.testing.assert_close(rot @ rot.t(), torch.eye(R), atol=1e-6, rtol=0)
        assert not any(b.numel() >= D * D for b in iv.buffers())                # no d x d buffer


def test_init_matches_pyreft_rng_stream():
    """Same seed -> same R and learned_source as pyreft's orthogonal-parametrised construction."""
    torch.manual_seed(7)
    weight = torch.nn.Parameter(torch.empty(D, R))
    torch.nn.init.orthogonal_(weight)
    holder = torch.nn.Module()
    holder.weight = weight
    holder = torch.nn.utils.parametrizations.orthogonal(holder)
    source = torch.nn.Linear(D, R).to(torch.bfloat16)
    torch.manual_seed(7)
    ours = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R)
    torch.testing.assert_close(ours.rotate_layer.weight, holder.weight.detach().t(), atol=1e-6, rtol=0)
    assert torch.equal(ours.learned_source.weight, source.weight)


def test_rotation_stays_orthonormal_under_adamw_with_weight_decay():
    iv = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    start = iv.rotate_layer.weight.detach().clone()
    opt = torch.optim.AdamW(iv.parameters(), lr=1e-2, weight_decay=0.1)
    target = torch.randn(8, 6, D)
    for _ in range(200):
        opt.zero_grad()
        loss = (iv(target) - target.flip(-1)).pow(2).mean()
        loss.backward()
        opt.step()
    rot = iv.rotate_layer.weight.detach()
    assert (rot @ rot.t() - torch.eye(R)).norm() <= 1e-5
    assert (rot - start).abs().max() > 1e-2                          # it did train


@pytest.mark.parametrize("layout", ["rd", "dr"])
def test_set_weight_from_ours_or_pyreft_layout(layout):
    q, _ = torch.linalg.qr(torch.randn(D, R))
    rot = OrthonormalRotation(D, R)
    rot.set_weight(q.t() if layout == "rd" else q)
    torch.testing.assert_close(rot.weight, q.t(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not orthonormal"):
        rot.set_weight(torch.randn(R, D))
    with pytest.raises(ValueError, match="shape"):
        rot.set_weight(torch.randn(R, D + 1))


def test_dropout_only_in_training_mode():
    iv = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, dropout=0.5)
    base = torch.randn(2, 4, D)
    iv.eval()
    torch.testing.assert_close(iv(base), pyreft_formula(iv, base), rtol=1e-5, atol=1e-5)
    iv.train()
    out = iv(base)
    zeros = (out == 0).float().mean().item()
    assert 0.3 < zeros < 0.7                                          # whole edited row dropped
    assert pyreft.ConsreftIntervention(embed_dim=D, low_rank_dimension=R, dropout=0.5).dropout_p == 0.0


def test_edit_fast_path_equals_gathered_forward():
    iv = pyreft.DireftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    hidden = torch.randn(2, 7, D)
    pos = torch.tensor([[1, 4], [6, -1]])
    out = iv.edit(hidden, pos, backend="torch")
    torch.testing.assert_close(out[0, [1, 4]], iv(hidden[0:1, [1, 4]])[0])
    torch.testing.assert_close(out[1, 6], iv(hidden[1:2, [6]])[0, 0])
    torch.testing.assert_close(out[1, :6], hidden[1, :6])


def test_bad_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="embed_dim"):
        pyreft.LoreftIntervention(embed_dim=None, low_rank_dimension=R)
    with pytest.raises(ValueError, match="low_rank_dimension"):
        pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=D + 1)
    with pytest.raises(ValueError, match="act"):
        pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, act_fn="nope")
    with pytest.raises(TypeError, match="dtype"):
        pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype="float33")


def test_intervention_class_lookup_accepts_pyvene_type_strings():
    assert intervention_class("<class 'pyreft.interventions.NoreftIntervention'>") is pyreft.NoreftIntervention
    assert intervention_class("LobireftIntervention") is pyreft.LobireftIntervention
    with pytest.raises(ValueError, match="unknown"):
        intervention_class("FooIntervention")
    assert set(INTERVENTION_CLASSES) >= {c.__name__ for c in CLASSES}


def test_config_keys_and_json_roundtrip():
    reps = [{"layer": 3, "component": "block_output", "low_rank_dimension": R,
             "intervention": pyreft.NoreftIntervention(embed_dim=D, low_rank_dimension=R, add_bias=False,
                                                       dtype=torch.float32, dropout=0.1, act_fn="relu")},
            {"layer": 3, "component": "block_output", "low_rank_dimension": R,
             "intervention_type": "LoreftIntervention"},
            {"layer": 3, "component": "model.layers[3].output", "low_rank_dimension": R,
             "intervention_type": pyreft.LobireftIntervention}]
    config = ReftConfig(representations=reps)
    assert config.keys == ["layer_3_comp_block_output_unit_pos_nunit_1#0",
                           "layer_3_comp_block_output_unit_pos_nunit_1#1",
                           "comp_model_layers[3]_output_unit_pos_nunit_1#0"]
    data = json.loads(config.to_json())
    assert data["representations"][0]["intervention_kwargs"] == {
        "embed_dim": D, "low_rank_dimension": R, "dtype": "float32", "dropout": 0.1, "act_fn": "relu",
        "add_bias": False}
    again = ReftConfig.from_json(config.to_json())
    assert again.to_dict() == data
    built = intervention_class(again.representations[0].intervention_type)(**again.representations[0].kwargs())
    assert built.config_kwargs() == data["representations"][0]["intervention_kwargs"]


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="intervention_type"):
        ReftConfig(representations={"layer": 1, "component": "block_output", "low_rank_dimension": 4})
    with pytest.raises(TypeError, match="unknown keys"):
        ReftConfig(representations={"layer": 1, "component": "block_output", "lyer": 2,
                                    "intervention_type": "LoreftIntervention"})
    with pytest.raises(ValueError, match="unit"):
        ReftConfig(representations={"layer": 1, "component": "block_output", "unit": "h.pos",
                                    "intervention_type": "LoreftIntervention"})
