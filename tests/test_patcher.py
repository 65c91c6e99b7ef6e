"""The patched model against hand-written hooks + the float64 oracle, on tiny random models."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, LlamaModel, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaForMaskedLM,
                          RobertaForSequenceClassification, RobertaModel)

import reft_kernels as pyreft
from reft_kernels.ops import resolve_backend
from reft_kernels.ops.reference import reft_edit_reference

H, RANK = 64, 4
SMALL = dict(hidden_size=H, intermediate_size=128, num_attention_heads=4, vocab_size=100)


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(cls=LlamaForCausalLM, layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(LlamaConfig(num_hidden_layers=layers, num_key_value_heads=2, pad_token_id=0, **SMALL, **kw)).eval()


def roberta(cls=RobertaModel, layers=2, seed=0):
    torch.manual_seed(seed)
    return cls(RobertaConfig(num_hidden_layers=layers, max_position_embeddings=40, **SMALL)).eval()


def loreft(**kw):
    return pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.float32, **kw)


def rep(layer, component, intervention=None, **kw):
    return {"layer": layer, "component": component, "low_rank_dimension": RANK,
            "intervention": intervention or loreft(), **kw}


def oracle(iv, hidden, positions):
    proj, weight, bias, proj_bias = iv.op_tensors()
    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return reft_edit_reference(hidden.double(), positions, f64(proj), f64(weight), f64(bias), f64(proj_bias),
                               variant=iv.variant, act=iv.act_fn).to(hidden.dtype)


def add_reference_hook(module, kind, iv, positions):
    """A plain hook applying the oracle edit at ``module``'s output or input."""
    if kind == "output":
        def hook(mod, args, output):
            if isinstance(output, torch.Tensor):
                return oracle(iv, output, positions)
            return (oracle(iv, output[0], positions), *output[1:])
        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        if args:
            return (oracle(iv, args[0], positions), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": oracle(iv, kwargs["hidden_states"], positions)}
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def expected_output(model, sites, inputs):
    """Run ``model`` with reference hooks at (module, kind, intervention, (B, P) positions) sites."""
    handles = [add_reference_hook(*site) for site in sites]
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        for h in handles:
            h.remove()


def run_reft(model, reps, inputs, locs, backend="torch"):
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend=backend)
    with torch.no_grad():
        _, out = reft(inputs, unit_locations={"sources->base": (None, locs)})
    return reft, out


LOCS = [[[0, 8], [3, -1], [5, 5]]]
IDS = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("component,path,kind", [
    ("block_output", "model.layers[1]", "output"),
    ("block_input", "model.layers[1]", "input"),
    ("mlp_output", "model.layers[1].mlp", "output"),
    ("mlp_input", "model.layers[1].mlp", "input"),
    ("attention_output", "model.layers[1].self_attn", "output"),   # a tuple output
    ("attention_input", "model.layers[1].self_attn", "input"),     # a keyword input
    ("model.layers[1].output", "model.layers[1]", "output"),
    ("model.layers[0].post_attention_layernorm.input", "model.layers[0].post_attention_layernorm", "input"),
])
def test_llama_components_match_reference(component, path, kind):
    model = llama()
    iv = loreft()
    reft, out = run_reft(model, [rep(1, component, iv)], {"input_ids": IDS}, LOCS)
    reft.unload()
    exp = expected_output(model, [(model.get_submodule(path.replace("[", ".").replace("]", "")), kind, iv,
                                   torch.tensor(LOCS[0]))], {"input_ids": IDS})
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["NoreftIntervention", "DireftIntervention", "NodireftIntervention",
                                     "ConsreftIntervention", "LobireftIntervention"])
def test_every_variant_built_from_config_matches_reference(variant):
    model = llama()
    reps = [{"layer": 0, "component": "block_output", "low_rank_dimension": RANK, "intervention_type": variant,
             "intervention_kwargs": {"dtype": "float32", "act_fn": "relu"}}]
    reft, out = run_reft(model, reps, {"input_ids": IDS}, LOCS)
    iv = reft.interventions["layer_0_comp_block_output_unit_pos_nunit_1#0"]
    assert type(iv).__name__ == variant and iv.embed_dim == H
    reft.unload()
    exp = expected_output(model, [(model.model.layers[0], "output", iv, torch.tensor(LOCS[0]))], {"input_ids": IDS})
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,layers_of,output", [
    (lambda: llama(LlamaModel), lambda m: m.layers, "last_hidden_state"),
    (lambda: llama(LlamaForSequenceClassification, num_labels=3), lambda m: m.model.layers, "logits"),
    (lambda: MistralForCausalLM(MistralConfig(num_hidden_layers=2, num_key_value_heads=2, **SMALL)).eval(),
     lambda m: m.model.layers, "logits"),
    (lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **SMALL)).eval(),
     lambda m: m.model.layers, "logits"),
    (lambda: roberta(RobertaModel), lambda m: m.encoder.layer, "last_hidden_state"),
    (lambda: roberta(RobertaForSequenceClassification), lambda m: m.roberta.encoder.layer, "logits"),
    (lambda: roberta(RobertaForMaskedLM), lambda m: m.roberta.encoder.layer, "logits"),
], ids=["LlamaModel", "LlamaForSeqCls", "Mistral", "Qwen2", "RobertaModel", "RobertaForSeqCls", "RobertaForMLM"])
def test_model_families_block_output(make, layers_of, output):
    model = make()
    iv = loreft()
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    inputs = {"input_ids": IDS, "attention_mask": mask}
    reft, out = run_reft(model, [rep(1, "block_output", iv)], inputs, LOCS)
    reft.unload()
    exp = expected_output(model, [(layers_of(model)[1], "output", iv, torch.tensor(LOCS[0]))], inputs)
    torch.testing.assert_close(getattr(out, output), getattr(exp, output), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("component,path,kind", [
    ("block_input", "roberta.encoder.layer[1]", "input"),
    ("mlp_input", "roberta.encoder.layer[1].intermediate", "input"),
    ("attention_output", "roberta.encoder.layer[1].attention.output.dense", "output"),
    ("attention_input", "roberta.encoder.layer[1].attention", "input"),
])
def test_roberta_components_match_reference(component, path, kind):
    model = roberta(RobertaForMaskedLM)
    iv = loreft()
    reft, out = run_reft(model, [rep(1, component, iv)], {"input_ids": IDS}, LOCS)
    reft.unload()
    module = model.get_submodule(path.replace("[", ".").replace("]", ""))
    exp = expected_output(model, [(module, kind, iv, torch.tensor(LOCS[0]))], {"input_ids": IDS})
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)


def test_roberta_string_component_and_mlp_output():
    model = roberta(RobertaForSequenceClassification)
    a, b = loreft(), loreft()
    reps = [rep(0, "roberta.encoder.layer[0].output", a), rep(1, "mlp_output", b)]
    locs = LOCS + [[[1], [2], [3]]]
    reft, out = run_reft(model, reps, {"input_ids": IDS}, locs)
    assert list(reft.interventions) == ["comp_roberta_encoder_layer[0]_output_unit_pos_nunit_1#0",
                                        "layer_1_comp_mlp_output_unit_pos_nunit_1#0"]
    reft.unload()
    layers = model.roberta.encoder.layer
    exp = expected_output(model, [(layers[0], "output", a, torch.tensor(locs[0])),
                                  (layers[1].output.dense, "output", b, torch.tensor(locs[1]))], {"input_ids": IDS})
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)


def test_untied_first_last_on_one_layer_compose_in_config_order():
    """f+l untied: two interventions on one module; overlapping positions get I_l(I_f(h))."""
    model = llama(layers=3)
    reps, sites, locs = [], [], []
    for i, layer in enumerate([0, 2, 0, 2]):
        iv = loreft()
        reps.append(rep(layer, "block_output", iv))
        pos = [[0, 1], [0, 4], [2, 8]] if i < 2 else [[7, 8], [4, -1], [8, 1]]
        locs.append(pos)
        sites.append((model.model.layers[layer], "output", iv, torch.tensor(pos)))
    reft, out = run_reft(model, reps, {"input_ids": IDS}, locs)
    assert list(reft.interventions)[2] == "layer_0_comp_block_output_unit_pos_nunit_1#1"
    reft.unload()
    order = [sites[0], sites[2], sites[1], sites[3]]                   # per module, config order
    exp = expected_output(model, order, {"input_ids": IDS})
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_backends_agree_forward_and_backward(backend):
    try:
        resolve_backend(backend, torch.device("cpu"))
    except (RuntimeError, ImportError) as err:
        pytest.skip(f"{backend} backend unavailable: {err}")
    results = []
    for name in ("torch", backend):
        model = llama()
        torch.manual_seed(3)
        reps = [rep(0, "block_output", loreft(dropout=0.2)), rep(1, "mlp_output", loreft(act_fn="gelu"))]
        reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend=name)
        reft.train()
        torch.manual_seed(4)
        locs = torch.tensor([[[0, 3], [8, 8]], [[2, -1], [1, 5]], [[4, 5], [6, 7]]])
        out = reft(input_ids=IDS, intervention_locations=locs, labels=IDS)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad for p in reft.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-5)


def test_tensor_path_equals_unit_locations_path_and_trains_only_interventions():
    model = llama()
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=[rep(0, "block_output"),
                                                                           rep(1, "block_output")]),
                                 backend="torch")
    locs = [[[0, 1], [2, 3], [4, -1]], [[8], [7], [6]]]
    _, a = reft({"input_ids": IDS}, unit_locations={"sources->base": (None, locs)}, labels=IDS)
    tensor = torch.tensor([[locs[0][b], locs[1][b] + [-1]] for b in range(3)])    # (B, n_int, P)
    b = reft(input_ids=IDS, intervention_locations=tensor, labels=IDS)
    torch.testing.assert_close(a.logits, b.logits)
    leaves = [[torch.tensor(row) for row in rows] for rows in locs]                # pyvene-style tensor leaves
    _, c = reft({"input_ids": IDS}, unit_locations={"sources->base": (None, leaves)}, labels=IDS)
    torch.testing.assert_close(a.logits, c.logits)
    with pytest.raises(ValueError, match=r"contains 99, outside \[-1, "):
        reft({"input_ids": IDS}, unit_locations={"sources->base": (None, [[[99]] * 3, [[0]] * 3])})
    b.loss.backward()
    trainable = {n for n, p in reft.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("interventions.") for n in trainable)
    assert all(p.grad is not None for n, p in reft.named_parameters() if n in trainable)
    assert trainable <= set(reft.state_dict())
    assert not model.training and reft.interventions["layer_0_comp_block_output_unit_pos_nunit_1#0"].training
    reft.eval()
    assert not any(iv.training for iv in reft.interventions.values())


def test_unload_restores_bit_identical_outputs_and_keeps_third_party_hooks():
    model = llama()
    calls = []
    model.model.layers[1].register_forward_hook(lambda m, a, o: calls.append("theirs"))
    with torch.no_grad():
        before = model(input_ids=IDS, output_hidden_states=True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=rep(1, "block_output")), backend="torch")
    with torch.no_grad():
        _, edited = reft({"input_ids": IDS}, unit_locations={"base": 3})
        plain = model(input_ids=IDS)                       # outside ReftModel: no edit
    assert calls == ["theirs"] * 3
    assert not torch.equal(edited.logits, before.logits)
    assert torch.equal(plain.logits, before.logits)
    assert reft.unload() is model
    with torch.no_grad():
        after = model(input_ids=IDS, output_hidden_states=True)
    assert torch.equal(after.logits, before.logits)
    assert all(torch.equal(x, y) for x, y in zip(after.hidden_states, before.hidden_states))
    assert calls == ["theirs"] * 4
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    with pytest.raises(RuntimeError, match="unloaded"):
        reft({"input_ids": IDS}, unit_locations={"base": 3})


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reapplies_same_edit_and_dropout(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = llama(layers=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()     # reentrant checkpoints of a frozen model need it (as PEFT)
        torch.manual_seed(5)
        reps = [rep(0, "mlp_output", loreft(dropout=0.3)), rep(1, "block_output", loreft(dropout=0.3))]
        reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend="torch")
        reft.train()
        torch.manual_seed(6)
        out = reft(input_ids=IDS, intervention_locations=torch.tensor([[[1, 2]] * 2] * 3), labels=IDS)
        out.loss.backward()
        grads.append([p.grad.clone() for p in reft.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unsupported_model_and_component_errors_list_alternatives():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=100)).eval()
    reft = pyreft.get_reft_model(gpt2, pyreft.ReftConfig(representations=rep(0, "block_output")))
    assert reft.adapters.sites["default"][0].module is gpt2.transformer.h[0]                   # GPT-2 is a known family now
    reft.unload()
    reft = pyreft.get_reft_model(gpt2, pyreft.ReftConfig(representations=rep(0, "transformer.h[0].output")))
    assert list(reft.interventions) == ["comp_transformer_h[0]_output_unit_pos_nunit_1#0"]
    reft.unload()
    with pytest.raises(ValueError, match=r"_AliasingModel.*string component.*such as"):   # no block list
        pyreft.get_reft_model(_AliasingModel(), pyreft.ReftConfig(representations=rep(0, "block_output")))
    model = llama()
    for bad, match in [(rep(0, "mlp_activation"), "mlp_activation.*block_output"),
                       (rep(5, "block_output"), "layer=5.*0..1"),
                       (rep("1", "block_output"), "layer='1'.*must be an int"),
                       (rep(0, "model.layers[0].nothing.output"), "has no 'nothing'"),
                       (rep(0, "model.layers[0].outputs"), "'.output' or"),
                       (rep(0, "block_output", pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=2)),
                        "embed_dim=32.*64")]:
        with pytest.raises((ValueError, TypeError), match=match):
            pyreft.get_reft_model(model, pyreft.ReftConfig(representations=bad))


def test_bad_locations_name_the_argument_and_the_fix():
    model = llama()
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=[rep(0, "block_output")] * 2),
                                 backend="torch")
    inputs = {"input_ids": IDS}
    cases = [({"sources->base": (None, [[[0]] * 3])}, "2 intervention entries|1 intervention entries"),
             ({"sources->base": (None, [[[0]] * 3, [[9]] * 3])}, r"\[-1, 9\)"),
             ({"sources->base": (None, [[[0]] * 2, [[0]] * 2])}, "2 rows but the batch has 3"),
             ({"sources->base": (None, [[0, 1]] * 3)}, "nested"),
             ([1, 2], "unit_locations")]
    for locs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            reft(inputs, unit_locations=locs)
    with pytest.raises(ValueError, match=r"\(3, 2, P\)"):
        reft(input_ids=IDS, intervention_locations=torch.zeros(3, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="intervention_locations contains 9"):
        reft(input_ids=IDS, intervention_locations=torch.full((3, 2, 1), 9))
    with pytest.raises(TypeError, match="int32/int64"):
        reft(input_ids=IDS, intervention_locations=torch.zeros(3, 2, 1))


def test_bf16_model_with_pyreft_default_dtypes():
    """pyreft's defaults on a bf16 model: bf16 learned_source, fp32 R; edited rows as the oracle's."""
    model = llama().to(torch.bfloat16)
    iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK)           # dtype=bf16 default
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=rep(0, "block_output", iv)),
                                 backend="torch")
    with torch.no_grad():
        _, out = reft({"input_ids": IDS, "output_hidden_states": True},
                      unit_locations={"sources->base": (None, LOCS)})
    reft.unload()
    captured = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: captured.append(_first(o).clone()))
    with torch.no_grad():
        model(input_ids=IDS)
    handle.remove()
    expected = oracle(iv, captured[0], torch.tensor(LOCS[0]))
    assert out.hidden_states[1].dtype == torch.bfloat16
    torch.testing.assert_close(out.hidden_states[1], expected, rtol=1.6e-2, atol=1e-2)
    assert not torch.equal(out.hidden_states[1], captured[0])


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def test_hooks_installed_once_and_only_on_intervened_modules():
    model = llama(layers=3)
    count = lambda: {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}  # noqa: E731
    before = count()
    reps = [rep(1, "block_output"), rep(1, "model.layers[1].output"), rep(2, "mlp_input")]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), backend="torch")
    gathered = []                 # FSDP / ZeRO-3 gather parameters in such module pre-hooks
    for iv in reft.interventions.values():
        iv.register_forward_pre_hook(lambda m, a: gathered.append(m))
    for _ in range(2):
        reft(input_ids=IDS, intervention_locations=torch.zeros(3, 3, 1, dtype=torch.long))
    assert gathered == list(reft.interventions.values()) * 2
    after = count()
    changed = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in before if after[n] != before[n]}
    assert changed == {"": (0, 1), "model.layers.1": (1, 0), "model.layers.2.mlp": (0, 1)}
    reft.unload()
    assert count() == before


class _AliasingModel(torch.nn.Module):
    """Any model works with string components; ``inner`` returns its input tensor itself."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, H)
        self.inner = torch.nn.Identity()

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return x + self.inner(x)


def test_output_aliasing_an_input_is_edited_out_of_place():
    model = _AliasingModel()
    iv = loreft()
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=rep(None, "inner.output", iv)),
                                 backend="torch")
    with torch.no_grad():
        _, out = reft({"input_ids": IDS}, unit_locations={"sources->base": (None, LOCS)})
        x = model.embed(IDS)
    torch.testing.assert_close(out, x + oracle(iv, x, torch.tensor(LOCS[0])), rtol=1e-5, atol=1e-5)
