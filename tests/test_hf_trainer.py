"""A plain ``transformers.Trainer`` (not our subclasses) trains a ReftModel, as HF users try first."""
import pytest
import torch
import transformers

import reft_kernels as pyreft
from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    rows = load_builtin_instructions()[:16]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    outputs = [r["output"] for r in rows]
    tok = build_word_tokenizer(prompts + outputs)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    torch.manual_seed(seed)
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=[{
        "layer": layer, "component": "block_output", "low_rank_dimension": 4,
        "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=4, dtype=torch.float32)}
        for layer in (0, 1)]), backend="torch")
    data = pyreft.make_multiple_position_supervised_data_module(
        tok, model, prompts, outputs, positions="f3+l3", num_interventions=2, share_weights=True)
    return tok, model, reft, data, len(rows)


def _args(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=2e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=10, disable_tqdm=True,
        remove_unused_columns=False, seed=0, weight_decay=0.0)


def test_plain_hf_trainer_follows_reft_trainer_exactly(tmp_path):
    """Same seed, data and arguments: the plain Trainer and ReftTrainerForCausalLM end equal."""
    ends = []
    for cls in (transformers.Trainer, pyreft.ReftTrainerForCausalLM):
        tok, model, reft, data, _ = _setup()
        cls(model=reft, args=_args(tmp_path / cls.__name__), **data).train()
        ends.append({k: v.detach().clone() for k, v in reft.named_parameters() if v.requires_grad})
    assert ends[0].keys() == ends[1].keys()
    for k in ends[0]:
        torch.testing.assert_close(ends[0][k], ends[1][k], rtol=1e-5, atol=1e-6, msg=k)


def test_plain_hf_trainer_trains_only_the_interventions(tmp_path):
    tok, model, reft, data, n = _setup()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    iv_before = {k: v.detach().clone() for k, v in reft.named_parameters() if v.requires_grad}
    assert iv_before, "the ReftModel exposes no trainable parameters to the Trainer"
    full = data["data_collator"]([data["train_dataset"][i] for i in range(n)])
    with torch.no_grad():
        loss0 = float(reft(**full).loss)
    trainer = transformers.Trainer(model=reft, args=_args(tmp_path), train_dataset=data["train_dataset"],
                                   data_collator=data["data_collator"])
    trainer.train()
    reft.eval()
    with torch.no_grad():
        loss1 = float(reft(**full).loss)
    assert loss1 < loss0 - 0.02, (loss0, loss1)   # a random base: small, but a real decrease
    changed = [k for k, v in reft.named_parameters() if v.requires_grad and not torch.equal(v, iv_before[k])]
    assert changed, "no intervention parameter was updated"
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items()), "the base model changed"
    # the trained adapter round-trips through our checkpoint format
    reft.save(str(tmp_path / "adapter"))
    fresh = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=1)
    fresh.load_state_dict(base_before)
    again = pyreft.ReftModel.load(str(tmp_path / "adapter"), fresh, backend="torch").eval()
    with torch.no_grad():
        assert torch.equal(again(**full).logits, reft(**full).logits)
