"""ReFT on top of a PEFT LoRA model (pyreft users' pattern): both train, the base stays frozen,
the output equals LoRA merged into the weights + reference edit hooks, and the checkpoint
(``include_model=True``) carries the LoRA weights."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import reft_kernels as pyreft  # noqa: E402
from reft_kernels.families import resolve_site  # noqa: E402
from test_patcher import H, add_reference_hook, llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (0, 1)
IDS = torch.tensor([[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
POSITIONS = [[1, 4], [0, 5]]  # per batch row, the same for both interventions
UNITS = {"sources->base": (None, [POSITIONS] * len(LAYERS))}


def lora_model(seed=0, lora_seed=1):
    model = llama(seed=seed)
    torch.manual_seed(lora_seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # B != 0: LoRA changes the output
    return peft.get_peft_model(model, config)


def reft_on(model, seed=2):
    torch.manual_seed(seed)
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
             "intervention": pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=4)} for layer in LAYERS]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    reft.model.enable_adapter_layers()  # as pyreft's examples: get_reft_model froze LoRA too
    with torch.no_grad():
        for iv in reft.interventions.values():  # LoReFT starts as the identity: make the edit visible
            iv.learned_source.bias.normal_(std=0.5)
    return reft


def logits(reft):
    with torch.no_grad():
        return reft({"input_ids": IDS}, unit_locations=UNITS)[1].logits


def lora_names(model):
    return {n for n, _ in model.named_parameters() if "lora_" in n}


def test_layers_found_through_the_peft_wrapper():
    pm = lora_model()
    site = resolve_site(pm, 1, "block_output")
    assert site.module is pm.get_base_model().model.layers[1]
    assert site.path == "base_model.model.model.layers[1]"


def test_output_equals_merged_lora_plus_reference_edit():
    pm = lora_model()
    merged = copy.deepcopy(pm).merge_and_unload().eval()  # a plain LlamaForCausalLM, LoRA in its weights
    assert not lora_names(merged)
    reft = reft_on(pm).eval()
    positions = torch.tensor(POSITIONS)
    handles = [add_reference_hook(merged.model.layers[layer], "output", iv, positions)
               for layer, iv in zip(LAYERS, reft.interventions.values())]
    try:
        with torch.no_grad():
            expected = merged(input_ids=IDS).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        lora_only = pm(input_ids=IDS).logits  # hooks are live only inside a reft call
    got = logits(reft)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - lora_only).abs().max() > 1e-3  # the interventions did something
    with torch.no_grad():
        plain = llama()(input_ids=IDS).logits
    assert (lora_only - plain).abs().max() > 1e-3  # and so did LoRA


def test_training_step_updates_lora_and_reft_only():
    reft = reft_on(lora_model())
    reft.train()
    trainable = {n for n, p in reft.named_parameters() if p.requires_grad}
    lora = {f"model.{n}" for n in lora_names(reft.model)}
    assert len(lora) == 2 * 2 * len(LAYERS)  # lora_A, lora_B on q_proj and v_proj of each layer
    interventions = {n for n in trainable if n.startswith("interventions.")}
    assert trainable == lora | interventions and interventions
    before = {n: p.detach().clone() for n, p in reft.named_parameters()}
    optimizer = torch.optim.SGD([p for p in reft.parameters() if p.requires_grad], lr=0.1)
    out = reft({"input_ids": IDS}, unit_locations=UNITS, labels=IDS)[1]
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in reft.named_parameters() if not torch.equal(p, before[n])}
    assert lora <= changed and interventions & changed  # both kinds moved
    assert changed <= trainable  # and nothing of the base


def test_checkpoint_with_lora_weights_reloads_identical_logits(tmp_path):
    reft = reft_on(lora_model())
    reft.train()
    optimizer = torch.optim.SGD([p for p in reft.parameters() if p.requires_grad], lr=0.1)
    reft({"input_ids": IDS}, unit_locations=UNITS, labels=IDS)[1].loss.backward()
    optimizer.step()
    reft.eval()
    expected = logits(reft)
    reft.save_pretrained(tmp_path / "ck", include_model=True)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "ck" / "base_model.safetensors")
    assert set(saved) == lora_names(reft.model)  # exactly the trainable LoRA weights
    fresh = lora_model(lora_seed=99)  # same base, different LoRA init: the checkpoint must restore it
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=IDS).logits, reft.model(input_ids=IDS).logits)
    loaded = pyreft.ReftModel.from_pretrained(tmp_path / "ck", fresh)
    assert torch.equal(logits(loaded), expected)
    card = (tmp_path / "ck" / "README.md").read_text()
    assert f"{sum(v.numel() for v in saved.values()):,} in the base model" in card
