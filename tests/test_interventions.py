"""Intervention modules: pyreft's math, attribute layout, init RNG parity, the rotation, config."""
import json

import pytest
import torch

import reft_kernels as pyreft
from reft_kernels.model.config import ReftConfig
from reft_kernels.interventions.modules import INTERVENTION_CLASSES, OrthonormalRotation, intervention_class
from reft_kernels.interventions.rotation import apply_householder_base, householder_form

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
        assert iv.rotate_layer.base.shape == (D, D)       # the default: pyreft's d x d completion
        light = cls(embed_dim=D, low_rank_dimension=R, completion="compact")
        assert not any(b.numel() >= D * D for b in light.buffers())             # no d x d buffer


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


@pytest.mark.parametrize("orthogonal_map", ["householder", "cholesky_qr"])
@pytest.mark.parametrize("layout", ["rd", "dr"])
def test_set_weight_from_ours_or_pyreft_layout(layout, orthogonal_map):
    q, _ = torch.linalg.qr(torch.randn(D, R))
    rot = OrthonormalRotation(D, R, orthogonal_map)
    rot.set_weight(q.t() if layout == "rd" else q)
    torch.testing.assert_close(rot.weight, q.t(), atol=1e-6, rtol=0)
    for bad in (torch.randn(R, D), torch.zeros(R, D), torch.full((R, D), float("nan")),
                torch.cat([q.t()[:1]] * R)):                          # random, zero, NaN, rank 1
        with pytest.raises(ValueError, match="not orthonormal"):
            rot.set_weight(bad)
    with pytest.raises(ValueError, match="shape"):
        rot.set_weight(torch.randn(R, D + 1))


# ------------------------------------------------------------------------------------------
# the default rotation is torch's orthogonal parametrisation (pyreft's), without a d x d buffer

def torch_orthogonal(original, base):
    """pyreft's rotate_layer: torch's own parametrisation holding ``original`` and ``base``."""
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.empty(D, R))
    torch.nn.utils.parametrizations.orthogonal(holder)
    p = holder.parametrizations.weight
    with torch.no_grad():
        p.original.copy_(original)
        p[0].base.copy_(base)
    return holder


def random_pyreft_rotation(signs=(-1.0,) * R):
    original = 0.3 * torch.randn(D, R).tril(-1)
    original.diagonal().copy_(torch.tensor(signs))
    base, _ = torch.linalg.qr(torch.randn(D, D))
    return original, base


@pytest.mark.parametrize("full_base", [True, False], ids=["pyreft-base", "reflector-base"])
def test_householder_default_equals_torch_orthogonal(full_base):
    """Forward R and the gradient reaching the trainable tensor equal torch's parametrisation."""
    if full_base:     # loaded from pyreft's state: its d x d base is kept and used as pyreft does
        original, base = random_pyreft_rotation(signs=(-1.0, 1.0, -1.0, 1.0))
        rot = OrthonormalRotation(D, R)
        rot.load_state_dict({"parametrizations.weight.original": original,
                             "parametrizations.weight.0.base": base})
        assert rot.base is not None
    else:             # compact: base kept as r reflectors; export its (original, d x d base)
        rot = OrthonormalRotation(D, R, completion="compact")
        with torch.no_grad():
            rot.reflectors.copy_(0.3 * torch.randn(D, R))     # upper part must be ignored
        assert rot.base is None and not any(b.numel() >= D * D for b in rot.buffers())
        original, base = rot.pyreft_state()
        torch.testing.assert_close(base.T @ base, torch.eye(D), atol=1e-5, rtol=0)
    holder = torch_orthogonal(original, base)
    mix = torch.randn(R, D)
    ours_R, theirs_R = rot.weight, holder.weight.T
    # the same function; ours forms the Householder product in compact WY form (fast backward),
    # torch calls LAPACK's orgqr: equal to fp32 rounding (|R| <= 1, |grad| ~ |mix| ~ 1)
    torch.testing.assert_close(ours_R, theirs_R, atol=1e-6, rtol=0)
    (ours_R * mix).sum().backward()
    (theirs_R * mix).sum().backward()
    theirs_grad = holder.parametrizations.weight.original.grad
    torch.testing.assert_close(rot.reflectors.grad, theirs_grad, atol=1e-5, rtol=0)
    assert rot.reflectors.grad.triu().abs().max() == 0               # diagonal: no gradient
    assert theirs_grad.tril(-1).abs().max() > 1e-3                    # and the rest is not trivial


def test_householder_base_is_the_reflectors_of_the_initial_R():
    q, _ = torch.linalg.qr(torch.randn(D, R))
    form = householder_form(q)
    base = apply_householder_base(form, torch.eye(D))
    torch.testing.assert_close(base[:, :R], q, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.T @ base, torch.eye(D), atol=1e-6, rtol=0)
    eye_form = householder_form(torch.eye(D, R))                      # LAPACK tau == 0 everywhere
    torch.testing.assert_close(apply_householder_base(eye_form, torch.eye(D)), torch.eye(D))


def adamw_losses(rot, steps=30):
    torch.manual_seed(5)
    x, target = torch.randn(16, D), torch.randn(16, R)
    opt = torch.optim.AdamW(rot.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = (x @ rot.weight.T - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_trajectory_depends_on_the_completion_of_base():
    """Why a pyreft-loaded d x d base is kept: Adam is not rotation-invariant, so two bases with
    the same base[:, :r] (same R) train differently; the same base trains identically."""
    original, base = random_pyreft_rotation()
    original = original.triu()                                         # at init: A = 0, R = base[:, :r]
    u, _ = torch.linalg.qr(torch.randn(D - R, D - R))
    rotated = torch.cat([base[:, :R], base[:, R:] @ u], 1)
    runs = []
    for b in (base, base, rotated):
        rot = OrthonormalRotation(D, R)
        rot.load_state_dict({"parametrizations.weight.original": original,
                             "parametrizations.weight.0.base": b})
        runs.append(adamw_losses(rot))
    torch.testing.assert_close(runs[0][0], runs[2][0], atol=1e-6, rtol=0)   # same R at the start
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1e-2                      # measured: 0.1


def test_weight_decay_cannot_zero_the_rotation():
    """pyreft's .int() diagonal turns R into 0 after one decayed step; ours stays a rotation."""
    original, base = random_pyreft_rotation()
    holder = torch_orthogonal(original, base)
    rot = OrthonormalRotation(D, R)
    rot.load_state_dict({"parametrizations.weight.original": original,
                         "parametrizations.weight.0.base": base})
    for module in (holder, rot):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
        loss = module.weight.sum()
        loss.backward()
        opt.step()
    assert holder.weight.abs().max() == 0                              # the pyreft footgun
    W = rot.weight.detach()
    torch.testing.assert_close(W @ W.T, torch.eye(R), atol=1e-5, rtol=0)


def test_cholesky_qr_opt_in():
    torch.manual_seed(3)
    default = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R)
    torch.manual_seed(3)
    chol = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, orthogonal_map="cholesky_qr")
    torch.testing.assert_close(chol.rotate_layer.weight, default.rotate_layer.weight, atol=1e-6, rtol=0)
    assert torch.equal(chol.learned_source.weight, default.learned_source.weight)    # same RNG use
    assert [n for n, _ in chol.rotate_layer.named_parameters()] == ["basis"]
    assert chol.config_kwargs()["orthogonal_map"] == "cholesky_qr"
    # state converts both ways, R kept
    default.rotate_layer.load_state_dict(chol.rotate_layer.state_dict())
    torch.testing.assert_close(default.rotate_layer.weight, chol.rotate_layer.weight, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="orthogonal_map"):
        pyreft.DireftIntervention(embed_dim=D, low_rank_dimension=R, orthogonal_map="cayley")


@pytest.mark.parametrize("bad", ["zero", "rank1", "nan"])
def test_cholesky_basis_rank_deficient_raises(bad):
    rot = OrthonormalRotation(D, R, "cholesky_qr")
    with torch.no_grad():
        if bad == "zero":
            rot.basis.zero_()
        elif bad == "rank1":
            rot.basis.copy_(rot.basis[:1].expand(R, D) * torch.arange(1.0, R + 1).unsqueeze(1))
        else:
            rot.basis[1, 3] = float("nan")
    with pytest.raises(ValueError, match="rank-deficient"):
        rot.weight
    good = OrthonormalRotation(D, R)                                   # and as a loaded state
    with pytest.raises(ValueError, match="rank-deficient"):
        good.load_state_dict(rot.state_dict())


# ------------------------------------------------------------------------------------------
# pyreft's state dicts at the module level (both key generations), and back

def pyreft_full_keys(cls):
    """The keys of pyreft 0.1.0's nn.Module.state_dict() for ``cls`` (add_bias=True)."""
    rot = ["rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base"]
    dims = ["embed_dim", "interchange_dim"]
    linear = ["learned_source.weight", "learned_source.bias"]
    return {"LoreftIntervention": dims + rot + linear, "DireftIntervention": dims + rot + linear,
            "NoreftIntervention": dims + ["proj_layer.weight", "proj_layer.bias"] + linear,
            "NodireftIntervention": dims + ["proj_layer.weight", "proj_layer.bias"] + linear,
            "ConsreftIntervention": ["learned_source"] + dims + rot,
            "LobireftIntervention": ["learned_source"] + dims + rot}[cls.__name__]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_pyreft_state_dict_roundtrip_under_a_prefix(cls):
    src = cls(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, add_bias=True)
    with torch.no_grad():
        for name, p in src.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    sd = src.pyreft_state_dict()
    expected = (["weight", "bias", "rotate_layer"] if cls is pyreft.LoreftIntervention
                else pyreft_full_keys(cls))
    assert list(sd) == expected
    assert sd["embed_dim"].dtype == torch.int64 if "embed_dim" in sd else True
    base = torch.randn(2, 3, D)
    parent = torch.nn.ModuleDict({"iv": cls(embed_dim=D, low_rank_dimension=R, dtype=torch.float32,
                                            add_bias=True)})
    parent.load_state_dict({f"iv.{k}": v for k, v in sd.items()})
    torch.testing.assert_close(parent["iv"](base), src(base), atol=1e-5, rtol=0)
    if cls is not pyreft.LoreftIntervention and hasattr(src, "rotate_layer"):  # full state: exact
        assert torch.equal(parent["iv"].rotate_layer.reflectors.tril(-1), src.rotate_layer.reflectors.tril(-1))


def test_loreft_both_pyreft_key_generations_and_errors():
    src = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    original, base = random_pyreft_rotation()
    full = {"embed_dim": torch.tensor(D), "interchange_dim": torch.tensor(D),
            "rotate_layer.parametrizations.weight.original": original,
            "rotate_layer.parametrizations.weight.0.base": base,
            "learned_source.weight": src.learned_source.weight.detach(),
            "learned_source.bias": src.learned_source.bias.detach()}
    iv = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R)   # bf16 source: cast on load
    iv.load_state_dict(full)
    torch.testing.assert_close(iv.rotate_layer.weight, torch_orthogonal(original, base).weight.T.detach(),
                               atol=1e-6, rtol=0)
    slim = {"weight": src.learned_source.weight.detach(), "bias": src.learned_source.bias.detach(),
            "rotate_layer": iv.rotate_layer.weight.detach().T}
    iv2 = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32)
    iv2.load_state_dict(slim)
    torch.testing.assert_close(iv2.rotate_layer.weight, iv.rotate_layer.weight, atol=1e-6, rtol=0)
    assert torch.equal(iv2.learned_source.weight, src.learned_source.weight)
    with pytest.raises(ValueError, match="embed_dim=48 does not match embed_dim=32"):
        iv2.load_state_dict({**full, "embed_dim": torch.tensor(48)})
    decayed = original.clone()
    decayed.diagonal().mul_(0.999)
    with pytest.raises(ValueError, match="weight-decayed pyreft rotation"):
        iv2.load_state_dict({**full, "rotate_layer.parametrizations.weight.original": decayed})
    with pytest.raises(ValueError, match="rotate_layer: the loaded rotation weight is not orthonormal"):
        iv2.load_state_dict({**slim, "rotate_layer": torch.zeros(D, R)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        iv2.load_state_dict({**slim, "typo": torch.zeros(1)})


def test_old_basis_state_converts_to_the_default_map():
    torch.manual_seed(4)
    old = pyreft.ConsreftIntervention(embed_dim=D, low_rank_dimension=R, orthogonal_map="cholesky_qr")
    with torch.no_grad():
        old.rotate_layer.basis.add_(0.5 * torch.randn(R, D))          # a trained, non-orthonormal basis
    new = pyreft.ConsreftIntervention(embed_dim=D, low_rank_dimension=R)
    new.load_state_dict(old.state_dict())                             # keys: learned_source, rotate_layer.basis
    torch.testing.assert_close(new.rotate_layer.weight, old.rotate_layer.weight, atol=1e-6, rtol=0)


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


def test_non_orthogonal_pyreft_base_keeps_R_and_warns():
    """pyreft's LoReFT load_state_dict writes R into base[:, :r] of a random completion, leaving
    base non-orthogonal; such a state loads with R kept (re-anchored), with a warning."""
    original, base = random_pyreft_rotation()
    original = original.triu()                                         # A = 0: R = base[:, :r]
    q, _ = torch.linalg.qr(torch.randn(D, R))
    base[:, :R] = q
    rot = OrthonormalRotation(D, R)
    with pytest.warns(UserWarning, match="not orthogonal"):
        rot.load_state_dict({"parametrizations.weight.original": original,
                             "parametrizations.weight.0.base": base})
    assert rot.base is None
    torch.testing.assert_close(rot.weight, q.T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("orthogonal_map", ["householder", "cholesky_qr"])
def test_rotation_is_fp32_orthonormal_under_bf16_autocast(orthogonal_map):
    rot = OrthonormalRotation(D, R, orthogonal_map)
    trainable = next(rot.parameters())                                # reflectors or basis
    with torch.no_grad():
        trainable.add_(0.3 * torch.randn_like(trainable))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = rot.weight
        (W.sum()).backward()
    assert W.dtype == torch.float32
    torch.testing.assert_close(W @ W.T, torch.eye(R), atol=1e-6, rtol=0)
