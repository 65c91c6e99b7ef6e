"""Training batches in length groups without their padding (reft_kernels.model.length_groups).

The grouped step is checked against the one-call step on the same batch (loss and every intervention
gradient <= 1e-6 relative in fp32; Llama layout, Gemma, GPT-2; with and without
``num_items_in_batch``; the pyvene call form), and whole training runs against training with
``trim_padding=False`` (both trainers, the prefix cache, gradient accumulation; with gradient
checkpointing it must stay one call per batch). The grouping itself is checked against brute force, and every case it must leave
alone (dropout, adapter_ids, every-position edits, left padding, switched off) runs as one call.
"""
import inspect
import itertools
import random

import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels.model.length_groups import plan_groups, row_lengths
from reft_kernels.model.prefix_cache import PrefixCacheCallback
from test_prefix_cache import causal_lm, corpus, reft_on, targs  # noqa: F401 (corpus: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("input_ids", "attention_mask", "labels", "intervention_locations")


@pytest.fixture
def ragged(corpus):
    """The corpus with answers of very different lengths (some repeated 2-6 times)."""
    prompts, outputs, tok = corpus
    outputs = [" ".join([o] * (1 + (i * 5) % 6)) for i, o in enumerate(outputs)]
    tok.padding_side = "right"
    return prompts, outputs, tok


def data_of(ragged, reft):
    prompts, outputs, tok = ragged
    return rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts, outputs, positions="f2+l2",
                                                            num_interventions=2)


def batch_of(ragged, reft, rows=range(8)):
    data = data_of(ragged, reft)
    batch = data["data_collator"]([data["train_dataset"][i] for i in rows])
    return {k: v for k, v in batch.items() if k in KEYS}


def step(reft, batch, trim, **extra):
    """(loss, intervention gradients, the input shapes of every base call) of one training step."""
    reft.trim_padding, reft.labelled_logits = trim, True
    reft.train()
    reft.zero_grad()
    shapes = []
    handle = reft.model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        out = reft(**batch, **extra)
        out.loss.backward()
    finally:
        handle.remove()
    grads = torch.cat([p.grad.flatten() for p in reft.interventions.parameters() if p.grad is not None])
    return out.loss.detach(), grads, shapes


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
@pytest.mark.parametrize("count", [None, 41])
def test_grouped_step_equals_the_one_call_step(ragged, family, count):
    reft = reft_on(causal_lm(family, len(ragged[2])))
    batch = batch_of(ragged, reft)
    extra = {} if count is None else {"num_items_in_batch": torch.tensor(count)}
    signature = str(inspect.signature(reft.model.forward))
    if count is not None and "num_items_in_batch" not in signature and "kwargs" not in signature:
        pytest.skip("this transformers' models take no num_items_in_batch (added in 4.46)")
    loss_one, g_one, shapes_one = step(reft, batch, trim=False, **extra)
    loss_grp, g_grp, shapes_grp = step(reft, batch, trim=True, **extra)
    B, T = batch["input_ids"].shape
    assert shapes_one == [(B, T)]
    assert len(shapes_grp) >= 2 and sum(b for b, _ in shapes_grp) == B
    assert sum(b * t for b, t in shapes_grp) < 0.9 * B * T   # the padding really is skipped
    assert abs(float(loss_grp - loss_one)) <= 1e-6 * float(loss_one)
    assert rel(g_grp, g_one) <= 1e-6 and g_one.norm() > 0


def test_the_pyvene_call_form(ragged):
    reft = reft_on(causal_lm("llama", len(ragged[2])))
    batch = batch_of(ragged, reft)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    locs = batch["intervention_locations"].transpose(0, 1).tolist()
    reft.train()
    reft.labelled_logits = True
    losses = []
    for trim in (False, True):
        reft.trim_padding = trim
        original, out = reft(inputs, unit_locations={"sources->base": (None, locs)}, labels=batch["labels"])
        assert original is None and out.logits is None
        losses.append(float(out.loss))
    assert abs(losses[1] - losses[0]) <= 1e-6 * losses[0]


def test_row_lengths_take_the_last_attended_edited_or_labelled_position():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full((4, 6), -100)
    labels[1, 3] = 5           # a label on a padded column (kept: it enters the loss)
    positions = [torch.tensor([[0, -1], [1, -1], [4, 0], [-1, -1]])]   # row 2 edits padded column 4
    inputs = {"input_ids": torch.zeros(4, 6, dtype=torch.long), "attention_mask": mask, "labels": labels}
    assert row_lengths(inputs, positions) == [3, 4, 5, 6]
    assert row_lengths({**inputs, "attention_mask": None}, positions) == [6] * 4


def brute_force(lengths, penalty, max_groups):
    """Min over every cut of the sorted rows into <= max_groups contiguous runs."""
    n = sorted(lengths)
    charge = penalty * len(n) * max(n)
    best = None
    for k in range(1, min(max_groups, len(n)) + 1):
        for cuts in itertools.combinations(range(1, len(n)), k - 1):
            bounds = (0, *cuts, len(n))
            cost = sum((j - i) * n[j - 1] for i, j in zip(bounds, bounds[1:])) + (k - 1) * charge
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_plan_groups_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(1, 300)]) for _ in range(rng.randint(1, 9))]
    penalty, max_groups = rng.choice([0.0, 0.05, 0.1, 0.5]), rng.randint(1, 5)
    groups = plan_groups(lengths, penalty, max_groups)
    assert sorted(b for g in groups for b in g) == list(range(len(lengths)))   # every row exactly once
    assert len(groups) <= max_groups
    cost = sum(len(g) * max(lengths[b] for b in g) for g in groups) + (len(groups) - 1) * penalty * len(
        lengths) * max(lengths)
    assert cost == pytest.approx(brute_force(lengths, penalty, max_groups))


def test_uniform_rows_stay_one_group():
    assert plan_groups([7, 7, 7, 7]) == [[0, 1, 2, 3]]
    assert len(plan_groups([40, 41, 300, 42, 39, 40, 38, 41, 40, 43])) == 2


def test_cases_it_leaves_alone(ragged):
    """Each of these runs the batch as one call (and gives the one-call loss)."""
    def one_call(reft, batch, **extra):
        _, _, shapes = step(reft, batch, trim=True, **extra)
        return shapes == [tuple(batch["input_ids"].shape)]

    reft = reft_on(causal_lm("llama", len(ragged[2])))
    batch = batch_of(ragged, reft)
    assert not one_call(reft, batch)                                                 # the control: it groups
    assert one_call(reft_on(causal_lm("llama", len(ragged[2])), dropout=0.1), batch)  # intervention dropout
    assert one_call(reft, batch, adapter_ids=[rk.model.registry.DEFAULT_ADAPTER] * 8)
    reft.train()
    reft.trim_padding, reft.labelled_logits = True, False                          # labelled logits off
    shapes = []
    h = reft.model.register_forward_pre_hook(lambda m, a, k: shapes.append(1), with_kwargs=True)
    reft(**batch).loss.backward()
    h.remove()
    assert shapes == [1]
    gpt2 = causal_lm("gpt2", len(ragged[2]))
    gpt2.config.attn_pdrop = 0.1
    gpt2 = transformers.GPT2LMHeadModel(gpt2.config)                                 # dropout in the base
    assert one_call(reft_on(gpt2), batch_of(ragged, reft_on(gpt2)))
    reft.trim_padding, reft.labelled_logits = True, True
    reft.model.model.layers[0].ds_id = None   # (a module attribute is not a parameter's: still groups)
    assert not one_call(reft, batch)
    next(reft.model.parameters()).ds_id = 0   # DeepSpeed ZeRO-3 marks its parameters so
    assert one_call(reft, batch)
    del next(reft.model.parameters()).ds_id
    layer = reft.model.model.layers[0]
    FSDPModule = type("FSDPModule", (), {})                  # fully_shard swaps in a subclass of this mixin
    layer.__class__ = type("FSDPLayer", (FSDPModule, type(layer)), {})
    assert one_call(reft, batch)
    layer.__class__ = type(layer).__mro__[2]
    assert not one_call(reft, batch)
    left = dict(batch)   # left padding: every row's last attended token is the last column
    shift = (batch["attention_mask"] == 0).sum(1)
    left = {k: torch.stack([torch.roll(v[b], int(shift[b])) for b in range(8)]) for k, v in batch.items()
            if k != "intervention_locations"}
    left["intervention_locations"] = batch["intervention_locations"] + shift[:, None, None] * (
        batch["intervention_locations"] >= 0)
    assert one_call(reft, left)


def train(ragged, tmp_path, trim, plain=False, cache=True, **kw):
    prompts, outputs, tok = ragged
    reft = reft_on(causal_lm("llama", len(tok)))
    calls = []
    reft.model.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)),
                                         with_kwargs=True)
    data = data_of(ragged, reft)
    args = targs(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, **kw)
    if plain:
        reft.trim_padding = trim
        callbacks = [PrefixCacheCallback()] * cache + [rk.LabelledLogitsCallback()]
        trainer = transformers.Trainer(model=reft, args=args, callbacks=callbacks, **data)
    else:
        trainer = rk.ReftTrainerForCausalLM(model=reft, args=args, prefix_cache=cache, trim_padding=trim, **data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, torch.cat([p.detach().flatten() for p in reft.interventions.parameters()]), calls


@pytest.mark.parametrize("plain,cache,checkpointing", [(False, True, False), (False, False, True),
                                                       (True, True, False), (False, True, True)])
def test_training_is_the_same(ragged, tmp_path, plain, cache, checkpointing):
    """3 epochs of 16 rows, batch 8, gradient accumulation 2: every logged loss and the trained weights."""
    kw = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}) \
        if checkpointing else {}
    loss_one, w_one, calls_one = train(ragged, tmp_path / "a", False, plain, cache, **kw)
    loss_grp, w_grp, calls_grp = train(ragged, tmp_path / "b", True, plain, cache, **kw)
    assert len(loss_one) == len(loss_grp) == 3
    if checkpointing:   # recomputation in the backward would see the last group's plan: one call per batch
        assert calls_grp == calls_one and len(calls_one) == 6
    else:
        assert len(calls_grp) > len(calls_one) == 6   # the grouped run made more, smaller calls
    for a, b in zip(loss_grp, loss_one):
        assert abs(a - b) <= 1e-6 * abs(b), (loss_grp, loss_one)
    assert rel(w_grp, w_one) <= 1e-6
