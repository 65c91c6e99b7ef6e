"""Named adapters: registry, per-row adapter_ids (forward, generate, training), composition.

Independent paths: the float64 oracle applied by plain hooks (test_patcher.add_reference_hook),
one-row-at-a-time runs with ``set_adapter``, and separately built single-adapter ReftModels.
"""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as pyreft
from reft_kernels.model import patcher, plan as adapter_plan
from reft_kernels.checkpoint import export_pyreft
from reft_kernels.ops import reft_edit_multi
from reft_kernels.ops.reference import reft_edit_multi_reference, reft_edit_reference
from test_patcher import add_reference_hook

H = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        pad_token_id=0)).eval()


def make_iv(cls=pyreft.LoreftIntervention, rank=4, bias=2.0, **kw):
    iv = cls(embed_dim=H, low_rank_dimension=rank, dtype=torch.float32, **kw)
    with torch.no_grad():
        iv.learned_source.bias.uniform_(-bias, bias)
    return iv


def config(layer, iv, component="block_output"):
    return pyreft.ReftConfig(representations=[{"layer": layer, "component": component,
                                                "low_rank_dimension": iv.low_rank_dimension, "intervention": iv}])


@pytest.fixture
def multi():
    """default: LoReFT r4 @ layer 0; b: LoReFT r2 @ layer 0 (stacks with default); c: NoReFT r3 @
    layer 0 (another variant); d: LoReFT r4 @ layer 1."""
    model = tiny_llama()
    ivs = {"default": make_iv(), "b": make_iv(rank=2), "c": make_iv(pyreft.NoreftIntervention, rank=3),
           "d": make_iv()}
    layers = {"default": 0, "b": 0, "c": 0, "d": 1}
    reft = pyreft.get_reft_model(model, config(0, ivs["default"]), backend="torch")
    for name in ("b", "c", "d"):
        reft.add_adapter(name, config(layers[name], ivs[name]))
    return model, reft, ivs, layers


IDS = torch.randint(1, 100, (4, 7), generator=torch.Generator().manual_seed(3))
LOCS = [[[0, 6], [2, -1], [5, 1], [3, 3]]]


def units(locs):
    return {"sources->base": (None, locs)}


def reference_row(model, ivs, layers, chain, row, positions):
    """One row, its chain applied by oracle hooks in order."""
    handles = [add_reference_hook(model.model.layers[layers[n]], "output", ivs[n], torch.tensor([positions]))
               for n in chain]
    try:
        with torch.no_grad():
            return model(input_ids=IDS[row:row + 1]).logits
    finally:
        for h in handles:
            h.remove()


def test_registry_api_and_errors(multi):
    _, reft, _, _ = multi
    assert reft.adapter_names == ["default", "b", "c", "d"] and reft.active_adapters == ["default"]
    reft.set_adapter(["b", "d"])
    assert reft.active_adapters == ["b", "d"] and reft.active_adapter == "b"
    with pytest.raises(ValueError, match="adapter 'zzz' is unknown.*'default', 'b'"):
        reft.set_adapter("zzz")
    with pytest.raises(ValueError, match="exists"):
        reft.add_adapter("b", config(0, make_iv()))
    with pytest.raises(ValueError, match="without '.'"):
        reft.add_adapter("a.b", config(0, make_iv()))
    with pytest.raises(ValueError, match="one entry per input row \\(4 rows\\)"):
        reft(input_ids=IDS, adapter_ids=["b", "c"])
    with pytest.raises(ValueError, match="entry 9 is out of range for 4 adapters"):
        reft(input_ids=IDS, adapter_ids=[0, 1, 9, None])
    reft.delete_adapter("b")
    assert reft.adapter_names == ["default", "c", "d"] and reft.active_adapters == ["d"]
    assert set(reft.extra_adapters) == {"c", "d"}


def test_registry_stands_alone_on_its_interface():
    """The registry needs only the base model, the two module containers and a sites callback
    (ReftModel passes its interventions, extra_adapters and its patch's sync)."""
    from torch import nn
    from reft_kernels.model.registry import AdapterRegistry
    model, primary, extra, synced = tiny_llama(), nn.ModuleDict(), nn.ModuleDict(), []
    registry = AdapterRegistry(model, primary, extra, synced.append)
    ivs = {"a": make_iv(), "b": make_iv(rank=2)}
    registry.build("a", config(0, ivs["a"]))
    registry.build("b", config(1, ivs["b"]))
    assert registry.names == ["a", "b"] and list(primary.values()) == [ivs["a"]]
    assert list(extra["b"].values()) == [ivs["b"]]
    assert [s.module for s in synced[-1]] == [model.model.layers[0], model.model.layers[1]]
    registry.set_active(["b", "a"])
    registry.delete("a")                            # the next adapter becomes the primary one
    assert registry.primary == "b" and list(primary.values()) == [ivs["b"]] and len(extra) == 0
    assert registry.active == ["b"] and registry.primary_config.representations[0].layer == 1
    assert [s.module for s in synced[-1]] == [model.model.layers[1]]
    with pytest.raises(ValueError, match="adapter 'a' is unknown"):
        registry.modules("a")


def test_single_adapter_keeps_state_dict_and_hooks():
    model = tiny_llama()
    iv = make_iv()
    reft = pyreft.get_reft_model(model, config(1, iv), backend="torch")
    own = [k for k in reft.state_dict() if not k.startswith("model.")]
    assert own == [f"interventions.{k}.{p}" for k in reft.interventions for p in iv.state_dict()]
    assert {"learned_source.weight", "learned_source.bias"} < set(iv.state_dict())
    assert len(reft._patch.site_hooks) == 1
    reft.add_adapter("x", config(0, make_iv()))
    assert len(reft._patch.site_hooks) == 2
    reft.delete_adapter("x")
    assert len(reft._patch.site_hooks) == 1 and not model.model.layers[0]._forward_hooks


@pytest.mark.parametrize("ids", [["b", "default", None, "c"], [1, 0, -1, 2], ["d", ["default", "b"], "c", ["b", "d"]]])
def test_mixed_batch_forward_equals_each_row_alone(multi, ids):
    model, reft, ivs, layers = multi
    with torch.no_grad():
        out = reft(input_ids=IDS, adapter_ids=ids, intervention_locations=torch.tensor(LOCS).transpose(0, 1)).logits
    names = reft.adapter_names
    for row, entry in enumerate(ids):
        chain = [] if entry in (None, -1) else [names[e] if isinstance(e, int) else e
                                              for e in (entry if isinstance(entry, list) else [entry])]
        exp = reference_row(model, ivs, layers, chain, row, LOCS[0][row])
        torch.testing.assert_close(out[row:row + 1], exp, rtol=1e-5, atol=1e-5)


def test_stacked_adapters_use_one_op_call_per_site(multi, monkeypatch):
    _, reft, _, _ = multi
    calls = []
    real = adapter_plan.reft_edit_multi

    def counting(hidden, positions, ids, proj, *args, **kw):
        calls.append((ids.tolist(), tuple(proj.shape)))
        return real(hidden, positions, ids, proj, *args, **kw)

    monkeypatch.setattr(adapter_plan, "reft_edit_multi", counting)
    with torch.no_grad():
        reft(input_ids=IDS, adapter_ids=["b", "default", None, "b"], unit_locations=units(LOCS))
    assert calls == [([0, 1, -1, 0], (2, 4, H))]          # default (r4) and b (r2) stacked, ranks padded


def shard_like_fsdp(modules):
    """Each module's parameters hold NaN except inside its ``__call__`` (a forward pre-hook puts
    them back, a forward hook takes them away), as FSDP/ZeRO-3 keep sharded parameters outside
    a module's forward. Returns the list of modules whose pre-hook ran, in call order."""
    entered = []
    for module in modules:
        real = {name: p.detach().clone() for name, p in module.named_parameters()}

        def gather(mod, args, kwargs, real=real):
            entered.append(mod)
            for name, p in mod.named_parameters():
                p.data = real[name]

        def release(mod, args, kwargs, output):
            for name, p in mod.named_parameters():
                p.data = torch.full_like(p, float("nan"))

        release(module, (), {}, None)
        module.register_forward_pre_hook(gather, with_kwargs=True)
        module.register_forward_hook(release, with_kwargs=True)
    return entered


@pytest.mark.parametrize("ids", [["b", "b", "b", "b"], ["b", "default", None, "b"], [["default", "d"], "b", "c", "d"]])
def test_every_path_calls_the_intervention_modules(multi, ids):
    """The stacked (mixed-batch) path runs its op inside each stacked module's __call__, as the
    single path does: module hooks (FSDP's parameter gathering) fire, and the output is the one
    without hooks."""
    _, reft, _, _ = multi
    kwargs = dict(input_ids=IDS, adapter_ids=ids, unit_locations=units(LOCS))
    with torch.no_grad():
        expected = reft(**kwargs).logits
        entered = shard_like_fsdp([iv for n in reft.adapter_names for iv in reft.adapter_interventions(n).values()])
        out = reft(**kwargs).logits
    used = {n for entry in ids for n in (entry if isinstance(entry, list) else [entry]) if n is not None}
    assert {id(m) for m in entered} == {id(iv) for n in used for iv in reft.adapter_interventions(n).values()}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_set_adapter_and_disable_adapter(multi):
    model, reft, ivs, layers = multi
    reft.set_adapter("d")
    with torch.no_grad():
        out = reft(input_ids=IDS, unit_locations=units(LOCS)).logits
        with reft.disable_adapter():
            off = reft(input_ids=IDS, unit_locations=units(LOCS)).logits
        base = model(input_ids=IDS).logits
    for row in range(4):
        torch.testing.assert_close(out[row:row + 1], reference_row(model, ivs, layers, ["d"], row, LOCS[0][row]),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(off, base) and not torch.allclose(out, base)


def test_composition_applies_in_declared_order(multi):
    """set_adapter([b, default]) on one site: Phi_default(Phi_b(h)), which differs from the other order."""
    model, reft, ivs, layers = multi
    outs = {}
    for order in (["b", "default"], ["default", "b"]):
        reft.set_adapter(order)
        with torch.no_grad():
            outs[tuple(order)] = reft(input_ids=IDS, unit_locations=units(LOCS)).logits
        for row in range(4):
            exp = reference_row(model, ivs, layers, order, row, LOCS[0][row])
            torch.testing.assert_close(outs[tuple(order)][row:row + 1], exp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[("b", "default")], outs[("default", "b")])


def test_composition_equals_one_config_with_both_interventions(multi):
    """Composing two adapters at one site == one ReftModel holding both interventions in that order."""
    model, reft, ivs, _ = multi
    reft.set_adapter(["default", "c"])
    with torch.no_grad():
        composed = reft(input_ids=IDS, unit_locations=units(LOCS)).logits
    reft.unload()
    both = pyreft.ReftConfig(representations=[
        {"layer": 0, "component": "block_output", "low_rank_dimension": 4, "intervention": ivs["default"]},
        {"layer": 0, "component": "block_output", "low_rank_dimension": 3, "intervention": ivs["c"]}])
    one = pyreft.get_reft_model(model, both, backend="torch")
    with torch.no_grad():
        exp = one(input_ids=IDS, unit_locations=units(LOCS * 2)).logits
    torch.testing.assert_close(composed, exp, rtol=1e-6, atol=1e-6)


def oracle_multi(hidden, positions, ids, ivs):
    out = hidden.clone()
    for b, a in enumerate(ids.tolist()):
        if a >= 0:
            proj, weight, bias, proj_bias = ivs[a].op_tensors()
            out[b:b + 1] = reft_edit_reference(hidden[b:b + 1], positions[b:b + 1], proj.double(), weight.double(),
                                               bias.double(), None if proj_bias is None else proj_bias.double(),
                                               variant=ivs[a].variant, act=ivs[a].act_fn)
    return out


@pytest.mark.parametrize("op", [reft_edit_multi_reference, reft_edit_multi],
                         ids=["reference", "op"])
@pytest.mark.parametrize("variant", [pyreft.LoreftIntervention, pyreft.NoreftIntervention, pyreft.DireftIntervention])
def test_per_row_op_matches_float64_oracle_and_gradients(variant, op):
    torch.manual_seed(1)
    ivs = [make_iv(variant, rank=r, act_fn="relu") for r in (3, 1, 4)]
    hidden = torch.randn(5, 6, H, dtype=torch.float64)
    positions = torch.tensor([[0, 5, 5], [1, -1, -1], [2, 3, 4], [0, 0, -1], [5, 4, 3]])
    ids = torch.tensor([2, -1, 0, 1, 2])
    proj, weight, bias, proj_bias, ranks = adapter_plan.stack_weights(ivs)
    h1 = hidden.clone().requires_grad_(True)
    out = op(h1, positions, ids, proj.double(), weight.double(), bias.double(),
            None if proj_bias is None else proj_bias.double(), variant=ivs[0].variant, act="relu", ranks=ranks,
            backend="torch")
    h2 = hidden.clone().requires_grad_(True)
    exp = oracle_multi(h2, positions, ids, ivs)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[1], hidden[1])                          # the -1 row passes through
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [h1, *(p for iv in ivs for p in iv.parameters())], g, allow_unused=True)
    exp_grads = torch.autograd.grad(exp, [h2, *(p for iv in ivs for p in iv.parameters())], g, allow_unused=True)
    for a, b in zip(grads, exp_grads):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_mixed_batch_training_step_equals_each_adapter_alone(multi):
    """One backward of a mixed batch gives each adapter the gradient of training it alone on its rows."""
    model, reft, _, _ = multi
    reft.train()
    ids = ["b", "default", "b", "c"]
    tensor_locs = torch.tensor(LOCS).transpose(0, 1)
    out = reft(input_ids=IDS, adapter_ids=ids, intervention_locations=tensor_locs)
    out.logits.float().pow(2).mean(-1).sum().backward()
    mixed = {n: [p.grad.clone() for p in reft.adapter_interventions(n).parameters()] for n in ("default", "b", "c")}
    for name in ("default", "b", "c"):
        reft.zero_grad()
        rows = [i for i, x in enumerate(ids) if x == name]
        reft.set_adapter(name)
        alone = reft(input_ids=IDS[rows], intervention_locations=tensor_locs[rows])
        alone.logits.float().pow(2).mean(-1).sum().backward()
        for a, b in zip(mixed[name], reft.adapter_interventions(name).parameters()):
            torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in reft.adapter_interventions("d").parameters())   # unused adapter untouched


def gen(reft, ids, mask=None, **kw):
    return reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         pad_token_id=0, **kw)


@pytest.mark.parametrize("kw", [{}, {"use_cache": False}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}])
def test_mixed_generate_left_padded_equals_one_by_one(multi, kw):
    _, reft, ivs, _ = multi
    for iv in ivs.values():
        with torch.no_grad():
            iv.learned_source.bias.mul_(3)
    prompts = [IDS[0, :4], IDS[1], IDS[2, :6]]
    chains = ["c", ["default", "d"], None]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    out = gen(reft, ids, mask, adapter_ids=chains, **kw)        # unit_locations=None: every prompt position
    per = kw.get("num_return_sequences", 1)
    with reft.disable_adapter():
        base = gen(reft, ids, mask, **kw)
    assert not torch.equal(out[:2 * per], base[:2 * per]) and torch.equal(out[2 * per:], base[2 * per:])
    for b, (p, chain) in enumerate(zip(prompts, chains)):
        if chain is None:
            with reft.disable_adapter():
                alone = gen(reft, p[None], **kw)
        else:
            reft.set_adapter(chain)
            alone = gen(reft, p[None], **kw)
        assert torch.equal(out[b * per:(b + 1) * per, -5:], alone[:, -5:])


def test_mixed_generate_applies_no_dropout_in_training_mode():
    """Generation never applies intervention dropout, also when the adapters are in training mode
    (sampling mid-training) and a mixed batch stacks them into one per-row op call: the same tokens
    as each adapter alone, on every run."""
    a, b = make_iv(dropout=0.5), make_iv(rank=2, dropout=0.5)   # stackable: same variant, act, dropout
    reft = pyreft.get_reft_model(tiny_llama(), config(0, a), backend="torch")
    reft.add_adapter("b", config(0, b))
    reft.train()
    assert a.training and b.training
    mixed = [gen(reft, IDS[:2], adapter_ids=["default", "b"]) for _ in range(3)]
    alone = []
    for row, name in enumerate(("default", "b")):
        reft.set_adapter(name)
        alone.append(gen(reft, IDS[row:row + 1]))
    for out in mixed:
        assert torch.equal(out, torch.cat(alone))
    assert a.training and b.training   # modes restored after generate


def test_save_by_name_writes_the_single_adapter_files_and_loads_back(multi, tmp_path):
    model, reft, ivs, layers = multi
    reft.save(tmp_path / "d", adapter_name="d")
    reft.unload()
    single = pyreft.get_reft_model(model, config(1, ivs["d"]), backend="torch")
    single.save(tmp_path / "single")
    for name in ("reft_config.json", "adapter.safetensors"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    export_pyreft(single, tmp_path / "pyreft_format")
    single.unload()
    fresh = pyreft.get_reft_model(model, config(0, make_iv()), backend="torch")
    fresh.load_adapter(tmp_path / "d", adapter_name="ours")
    fresh.load_adapter(tmp_path / "pyreft_format", adapter_name="theirs")
    assert not fresh.adapter_interventions("ours").training
    with torch.no_grad():
        out = fresh(input_ids=IDS, adapter_ids=["ours", "theirs", "ours", None], unit_locations=units(LOCS)).logits
    for row in (0, 1, 2):
        torch.testing.assert_close(out[row:row + 1], reference_row(model, ivs, layers, ["d"], row, LOCS[0][row]),
                                   rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "d")) == ["README.md", "adapter.safetensors", "reft_config.json"]


def test_delete_every_adapter_leaves_the_base_model(multi):
    model, reft, _, _ = multi
    for name in list(reft.adapter_names):
        reft.delete_adapter(name)
    assert reft.adapter_names == [] and len(reft.interventions) == 0 and not reft._patch.site_hooks
    with torch.no_grad():
        assert torch.equal(reft(input_ids=IDS).logits, model(input_ids=IDS).logits)
    reft.add_adapter("new", config(1, make_iv()))
    assert reft.adapter_names == ["new"] and reft.adapter_interventions("new") is reft.interventions


def test_stacked_rows_with_different_location_indices(multi):
    """Adapter e's intervention 1 sits at layer 0, where default's intervention 0 sits: one stacked
    call whose rows read different locations (LOCS[1] for e's rows, LOCS[0] for default's)."""
    model, reft, ivs, layers = multi
    e1, e0 = make_iv(rank=3), make_iv(rank=2)
    reft.add_adapter("e", pyreft.ReftConfig(representations=[
        {"layer": 1, "component": "block_output", "low_rank_dimension": 3, "intervention": e1},
        {"layer": 0, "component": "block_output", "low_rank_dimension": 2, "intervention": e0}]))
    locs2 = [LOCS[0], [[1], [4, 2], [0], [6]]]
    with torch.no_grad():
        out = reft(input_ids=IDS, adapter_ids=torch.tensor([4, 0, 4, -1]), unit_locations=units(locs2)).logits
    for row, chain in ((0, "e"), (1, "default"), (2, "e")):
        if chain == "default":
            exp = reference_row(model, ivs, layers, ["default"], row, locs2[0][row])
        else:
            handles = [add_reference_hook(model.model.layers[1], "output", e1, torch.tensor([locs2[0][row]])),
                       add_reference_hook(model.model.layers[0], "output", e0, torch.tensor([locs2[1][row]]))]
            try:
                with torch.no_grad():
                    exp = model(input_ids=IDS[row:row + 1]).logits
            finally:
                for h in handles:
                    h.remove()
        torch.testing.assert_close(out[row:row + 1], exp, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out[3:], model(input_ids=IDS[3:]).logits)
    with pytest.raises(ValueError, match="unit_locations has 1 intervention entries but the adapters of this call have 2"):
        reft(input_ids=IDS, adapter_ids=["e", "b", None, None], unit_locations=units(LOCS))
