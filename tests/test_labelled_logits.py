"""Logits at labelled positions only (reft_kernels.model.labelled_logits): the same loss and gradients as
the full forward (<= 1e-6 relative, fp32; ReftTrainer* switch it on, a plain Trainer with
``LabelledLogitsCallback``), for a Llama-layout model, Gemma and GPT-2, with and without
``num_items_in_batch``, through ReftTrainerForCausalLM and a plain ``transformers.Trainer`` with
gradient accumulation, with and without the prefix cache; the head really sees only the labelled
rows; and every call that needs the logits gets the full forward."""
import inspect

import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels.model.labelled_logits import LabelledLogitsCallback, labelled_head
from reft_kernels.model.prefix_cache import PrefixCacheCallback
from test_prefix_cache import D, LAYERS, causal_lm, corpus, reft_on, targs  # noqa: F401 (corpus: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "gemma", "gpt2"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def batch_of(corpus, reft, n=6):
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts[:n], outputs[:n],
                                                            positions="f2+l2", num_interventions=2)
    rows = [data["train_dataset"][i] for i in range(n)]
    batch = data["data_collator"](rows)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "intervention_locations")}


def loss_and_grads(reft, batch, labelled, **extra):
    reft.labelled_logits = labelled
    reft.train()
    reft.zero_grad()
    out = reft(**batch, **extra)
    out.loss.backward()
    out.loss = out.loss.detach()
    grads = torch.cat([p.grad.flatten() for p in reft.interventions.parameters() if p.grad is not None])
    return out, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", [None, 37])
def test_same_loss_and_gradients_as_the_full_forward(corpus, family, count):
    reft = reft_on(causal_lm(family, len(corpus[2])))
    if count is not None and "num_items_in_batch" not in str(inspect.signature(reft.model.forward)) \
            and "kwargs" not in str(inspect.signature(reft.model.forward)):
        pytest.skip("this transformers' models take no num_items_in_batch (added in 4.46)")
    batch = batch_of(corpus, reft)
    extra = {} if count is None else {"num_items_in_batch": torch.tensor(count)}
    full, g_full = loss_and_grads(reft, batch, False, **extra)
    rows = []
    handle = reft.model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape))
    part, g_part = loss_and_grads(reft, batch, True, **extra)
    handle.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [torch.Size([labelled, D])] and labelled < batch["labels"].numel() / 2
    assert full.logits is not None and part.logits is None
    assert abs(float(part.loss) - float(full.loss)) <= 1e-6 * abs(float(full.loss))
    assert rel(g_part, g_full) <= 1e-6 and g_full.norm() > 0
    # the loss is HF's: the mean (or the sum over num_items_in_batch) of the shifted token losses, in float64
    logits = full.logits.double()[:, :-1].reshape(-1, full.logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), reduction="sum")
    ref = ref / (labelled if count is None else count)
    assert abs(float(part.loss) - float(ref)) <= 1e-6 * float(ref)


def test_the_pyvene_call_takes_it_too(corpus):
    reft = reft_on(causal_lm("llama", len(corpus[2])))
    batch = batch_of(corpus, reft, 4)
    locs = batch["intervention_locations"].transpose(0, 1).tolist()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    reft.train()
    losses = []
    for labelled in (False, True):
        reft.labelled_logits = labelled
        _, out = reft(inputs, unit_locations={"sources->base": (None, locs)}, labels=batch["labels"])
        losses.append(out.loss.detach())
        assert (out.logits is None) == labelled
    assert abs(float(losses[1] - losses[0])) <= 1e-6 * float(losses[0])


def test_calls_that_need_the_logits_get_them(corpus):
    reft = reft_on(causal_lm("llama", len(corpus[2])))
    batch = batch_of(corpus, reft, 3)
    shape = (*batch["input_ids"].shape, len(corpus[2]))
    reft.train()
    assert labelled_head(reft, batch) is None and reft(**batch).logits.shape == shape   # off unless switched on
    reft.labelled_logits = True
    assert labelled_head(reft, batch) is reft.model.lm_head
    for extra in ({"output_hidden_states": True}, {"output_attentions": True}, {"return_dict": False}):
        out = reft(**batch, **extra)
        logits = out[1] if isinstance(out, tuple) else out.logits
        assert logits.shape == shape, extra
    assert reft(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == shape   # no labels
    with torch.no_grad():
        assert reft(**batch).logits.shape == shape   # no gradients (evaluation)
    reft.eval()
    assert reft(**batch).logits.shape == shape       # eval mode
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=LAYERS,
                                                                num_attention_heads=2, intermediate_size=64))
    masked = reft_on(bert)
    masked.train()
    masked.labelled_logits = True
    assert labelled_head(masked, {"labels": torch.zeros(1, 3, dtype=torch.long)}) is None   # not a causal loss


def train(corpus, family, tmp_path, labelled, plain, cache):
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    reft = reft_on(causal_lm(family, len(tok)))
    losses, paths = [], []

    def record(module, args, out):
        losses.append(out["loss"].detach().clone())
        paths.append(out.get("logits") is None)

    reft.register_forward_hook(record)
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts, outputs, positions="f2+l2",
                                                            num_interventions=2)
    args = targs(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    if plain:
        callbacks = [PrefixCacheCallback()] * cache + [LabelledLogitsCallback()] * labelled
        trainer = transformers.Trainer(model=reft, args=args, callbacks=callbacks, **data)
    else:
        trainer = rk.ReftTrainerForCausalLM(model=reft, args=args, prefix_cache=cache, labelled_logits=labelled, **data)
    trainer.train()
    assert paths == [labelled] * len(paths)   # every step took the path asked for
    assert not getattr(reft, "labelled_logits", False)   # switched off again after train()
    return torch.stack(losses), torch.cat([p.detach().flatten() for p in reft.interventions.parameters()])


@pytest.mark.parametrize("family,plain,cache", [("llama", False, False), ("llama", False, True), ("llama", True, False),
                                                ("llama", True, True), ("gpt2", False, True), ("gpt2", True, False)])
def test_training_is_the_same(corpus, family, plain, cache, tmp_path):
    """3 epochs, batch 2, gradient accumulation 2: every micro-batch loss and the trained weights."""
    loss_full, w_full = train(corpus, family, tmp_path / "a", False, plain, cache)
    loss_part, w_part = train(corpus, family, tmp_path / "b", True, plain, cache)
    assert len(loss_full) == len(loss_part) == 24
    assert ((loss_part - loss_full).abs() <= 1e-6 * loss_full.abs()).all(), (loss_part - loss_full).abs().max()
    assert rel(w_part, w_full) <= 1e-6


def test_a_train_that_raised_does_not_leave_it_on(corpus, tmp_path):
    """A train() interrupted by an exception never reaches on_train_end; the next train() of the
    same trainer still restores what the model had before the first (off), not the interrupted
    run's setting (on)."""
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    reft = reft_on(causal_lm("llama", len(tok)))
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts[:4], outputs[:4],
                                                            positions="f2+l2", num_interventions=2)

    class Interrupt(transformers.TrainerCallback):
        fired = False

        def on_step_begin(self, args, state, control, **kw):
            if not Interrupt.fired:
                Interrupt.fired = True
                raise KeyboardInterrupt

    trainer = transformers.Trainer(model=reft, args=targs(tmp_path, per_device_train_batch_size=2, num_train_epochs=1),
                                   callbacks=[LabelledLogitsCallback(), Interrupt()], **data)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert reft.labelled_logits   # on_train_end never ran
    trainer.train()
    assert not getattr(reft, "labelled_logits", False)
