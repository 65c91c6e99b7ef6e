"""Decode-time interventions: generated tokens edited by a rule (all, every k-th, midfix steps),
the same with and without KV cache, for left-padded batches, beams, and mixed adapters; checked
against a hand-written full-recompute loop."""
import pytest
import torch

import reft_kernels as pyreft
from reft_kernels.model.edit_state import GeneratedPositions
from test_patcher import add_reference_hook

from tiny_llama_reft import H, two_layer_reft

NEW = 7
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return two_layer_reft(lambda bias: bias.uniform_(-6, 6))   # a strong edit, so tokens change


def gen_kwargs(**kw):
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def reference_greedy(model, ivs, prompt, prompt_positions, rule):
    """Full recomputation each step; hooks edit the prompt positions and the generated tokens
    ``L + j`` that ``rule`` selects among those in the sequence."""
    rule = GeneratedPositions.parse(rule)
    seq, L = prompt[None], len(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            generated = [L + j for j in range(seq.shape[1] - L) if rule is not None and rule.hits(j)]
            pos = torch.tensor([list(prompt_positions) + generated or [-1]])
            handles = [add_reference_hook(model.model.layers[i], "output", ivs[i], pos) for i in range(2)]
            try:
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            finally:
                for h in handles:
                    h.remove()
            seq = torch.cat([seq, nxt], dim=1)
    return seq


RULES = ["all", 2, [3], GeneratedPositions(every=3, start=1, steps=(0,))]


@pytest.mark.parametrize("rule", RULES, ids=["all", "every2", "midfix3", "every3from1+0"])
@pytest.mark.parametrize("on_prompt", [True, False])
def test_rules_cached_equal_uncached_equal_reference(setup, rule, on_prompt):
    model, ivs, reft, prompts = setup
    prompt = prompts[1]
    prompt_positions = [len(prompt) - 1, 0] if on_prompt else []
    locs = {"sources->base": (None, [[prompt_positions]] * 2)} if on_prompt else None
    outs = [reft.generate({"input_ids": prompt[None]}, unit_locations=locs, intervene_on_prompt=on_prompt,
                          generated_positions=rule, **gen_kwargs(use_cache=c))[1] for c in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], reference_greedy(model, ivs, prompt, prompt_positions, rule))


def test_rules_change_the_output_and_default_is_every_generated_token(setup):
    model, ivs, reft, prompts = setup
    prompt = prompts[0][None]
    base = model.generate(input_ids=prompt, **gen_kwargs())
    _, pyvene_default = reft.generate({"input_ids": prompt}, intervene_on_prompt=False, **gen_kwargs())
    _, explicit_all = reft.generate({"input_ids": prompt}, intervene_on_prompt=False, generated_positions="all",
                                    **gen_kwargs())
    assert torch.equal(pyvene_default, explicit_all) and not torch.equal(pyvene_default, base)
    _, late = reft.generate({"input_ids": prompt}, intervene_on_prompt=False, generated_positions=[4], **gen_kwargs())
    L = prompt.shape[1]
    assert torch.equal(late[:, :L + 5], base[:, :L + 5])   # token 4 is edited when fed: token 5 onwards may change
    assert torch.equal(late, reference_greedy(model, ivs, prompts[0], [], [4]))


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("kw", [{"use_cache": True}, {"use_cache": False}, {"num_beams": 3}],
                         ids=["cache", "no-cache", "beams"])
@pytest.mark.parametrize("rule", ["all", 2, [1, 4]], ids=["all", "every2", "midfix1,4"])
def test_left_padded_batch_equals_one_by_one(setup, kw, rule):
    _, _, reft, prompts = setup
    ids, mask = left_padded(prompts)
    _, out = reft.generate({"input_ids": ids, "attention_mask": mask}, intervene_on_prompt=False,
                           generated_positions=rule, **gen_kwargs(**kw))
    for b, prompt in enumerate(prompts):
        _, alone = reft.generate({"input_ids": prompt[None]}, intervene_on_prompt=False, generated_positions=rule,
                                 **gen_kwargs(**kw))
        assert torch.equal(out[b, -NEW:], alone[0, -NEW:])


def test_decode_time_with_mixed_adapters(setup):
    """Per-row adapters and a decode rule together: each row as if generated alone with its adapter."""
    model, ivs, reft, prompts = setup
    other = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=2, dtype=torch.float32)
    with torch.no_grad():
        other.learned_source.bias.uniform_(-6, 6)
    reft.add_adapter("other", pyreft.ReftConfig(representations=[
        {"layer": 1, "component": "block_output", "low_rank_dimension": 2, "intervention": other}]))
    try:
        ids, mask = left_padded(prompts)
        chains = ["other", "default", None]
        for use_cache in (True, False):
            out = reft.generate(input_ids=ids, attention_mask=mask, intervene_on_prompt=False, generated_positions=2,
                                adapter_ids=chains, **gen_kwargs(use_cache=use_cache))
            for b, (prompt, chain) in enumerate(zip(prompts, chains)):
                if chain is None:
                    alone = model.generate(input_ids=prompt[None], **gen_kwargs())
                else:
                    reft.set_adapter(chain)
                    alone = reft.generate(input_ids=prompt[None], intervene_on_prompt=False, generated_positions=2,
                                          **gen_kwargs(use_cache=use_cache))
                assert torch.equal(out[b, -NEW:], alone[0, -NEW:])
    finally:
        reft.set_adapter("default")
        reft.delete_adapter("other")


def test_bad_decode_arguments_raise(setup):
    _, _, reft, prompts = setup
    prompt = prompts[0][None]
    with pytest.raises(ValueError, match="intervene_on_prompt=False edits generated tokens only"):
        reft.generate({"input_ids": prompt}, unit_locations={"sources->base": (None, [[[0]]] * 2)},
                      intervene_on_prompt=False, **gen_kwargs())
    for bad, match in [(0, "every=0"), ([-1], "steps"), ("often", "generated_positions='often'")]:
        with pytest.raises((ValueError, TypeError), match=match):
            reft.generate({"input_ids": prompt}, generated_positions=bad, **gen_kwargs())
