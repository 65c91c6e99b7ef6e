"""save_pretrained / from_pretrained (PEFT-style names) and the model card README.md saved with an adapter."""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as rk
from reft_kernels import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")

H = 32
IDS = torch.tensor([[3, 5, 7, 9, 11, 13]])


def tiny_llama(name_or_path=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=50)).eval()
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    return model


def wrap(model, classes=("LoreftIntervention", "NoreftIntervention"), ranks=(4, 2)):
    torch.manual_seed(1)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": r,
             "intervention": getattr(rk, cls)(embed_dim=H, low_rank_dimension=r)}
            for i, (cls, r) in enumerate(zip(classes, ranks))]
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=reps))
    for p in reft.interventions.parameters():  # non-trivial weights (LoReFT starts as a no-op)
        torch.nn.init.normal_(p, std=0.3) if p.dim() == 1 else None
    return reft


def logits(reft):
    with torch.no_grad():
        return reft({"input_ids": IDS}, unit_locations={"sources->base": (None, [[[1, 4]]] * 2)})[1].logits


def front_matter(text):
    assert text.startswith("---\n"), text[:40]
    head, _, body = text[4:].partition("\n---\n")
    return head.splitlines(), body


def test_save_pretrained_from_pretrained_roundtrip_and_card(tmp_path):
    reft = wrap(tiny_llama("my-org/tiny-llama"))
    expected = logits(reft)
    path = reft.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["README.md", "adapter.safetensors", "reft_config.json"]
    loaded = rk.ReftModel.from_pretrained(tmp_path / "adapter", tiny_llama())
    assert not loaded.interventions.training  # as ReftModel.load
    assert torch.equal(logits(loaded), expected)

    head, body = front_matter((tmp_path / "adapter" / "README.md").read_text())
    assert "library_name: reft_kernels" in head
    assert 'base_model: "my-org/tiny-llama"' in head
    assert head[head.index("tags:") + 1:] == ["- reft", "- loreft", "- noreft"]
    n_adapter = sum(p.numel() for p in reft.interventions.parameters())
    assert f"Trainable parameters: {n_adapter:,} in the interventions." in body
    for key, iv in reft.interventions.items():
        cls = type(iv).__name__
        layer = 0 if cls == "LoreftIntervention" else 1
        rank = 4 if layer == 0 else 2
        assert f"| `{key}` | {cls} | {layer} | block_output | {rank} |" in body
    assert 'LlamaForCausalLM.from_pretrained("my-org/tiny-llama")' in body
    assert 'reft_kernels.ReftModel.from_pretrained("adapter", model)' in body


def test_card_snippet_runs(tmp_path):
    """The card's code block, run as written (with a local base model directory), loads the adapter."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    reft = wrap(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval())
    reft.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert str(tmp_path / "base") in code
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope = {}
        exec(code, scope)  # noqa: S102 - the card's own snippet
    finally:
        os.chdir(cwd)
    assert torch.equal(logits(scope["reft_model"].eval()), logits(reft))


def test_card_without_base_name_and_with_trainable_base_params(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = ""
    reft = wrap(model, classes=("LoreftIntervention",), ranks=(4,))
    reft.model.lm_head.weight.requires_grad_(True)
    reft.save(tmp_path / "ck")
    head, body = front_matter((tmp_path / "ck" / "README.md").read_text())
    assert not any(line.startswith("base_model:") for line in head)
    assert f"{reft.model.lm_head.weight.numel():,} in the base model (`base_model.safetensors`)" in body
    reft.save(tmp_path / "none", model_card=False)
    assert "README.md" not in os.listdir(tmp_path / "none")


def test_user_readme_is_kept_when_saving_again(tmp_path):
    reft = wrap(tiny_llama())
    reft.save_pretrained(tmp_path / "ck")
    ours = (tmp_path / "ck" / "README.md").read_text()
    reft.save_pretrained(tmp_path / "ck")  # our own card is rewritten
    assert (tmp_path / "ck" / "README.md").read_text() == ours
    (tmp_path / "ck" / "README.md").write_text("# My adapter\nhand-written notes\n")
    reft.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "README.md").read_text() == "# My adapter\nhand-written notes\n"
    ck.export_pyreft(reft, tmp_path / "ck")  # the pyreft export keeps it too
    assert (tmp_path / "ck" / "README.md").read_text() == "# My adapter\nhand-written notes\n"
    # pyreft's format stores LoReFT's rotation as an orthogonal parametrization: equal to rounding
    torch.testing.assert_close(logits(rk.ReftModel.from_pretrained(tmp_path / "ck", tiny_llama())),
                               logits(reft), rtol=1e-5, atol=1e-6)


def test_a_readme_the_user_wrote_is_kept_and_no_card_written(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("mine")
    wrap(tiny_llama()).save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / "README.md").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "d")) == ["README.md", "adapter.safetensors", "reft_config.json"]
