"""Generation: prompt positions are edited on the prefill (or every full recompute), never on
cached decode steps; batching with left padding and beam search give one-by-one results."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as pyreft
from test_patcher import add_reference_hook

from tiny_llama_reft import H, LENGTHS, RANK, two_layer_reft

NEW = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model, ivs, reft, prompts = two_layer_reft(lambda bias: bias.fill_(4.0))
    positions = [[[n - 1, 0], [1, n - 2]] for n in LENGTHS]           # per prompt: [intervention][pos]
    return model, ivs, reft, prompts, positions


def gen_kwargs(**kw):
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def one(reft, prompt, pos, **kw):
    locs = [[p] for p in pos]                                           # [intervention][batch=1][pos]
    _, out = reft.generate({"input_ids": prompt[None]}, unit_locations={"sources->base": (None, locs)},
                           intervene_on_prompt=True, **gen_kwargs(**kw))
    return out


def left_padded(prompts, positions):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    locs = [[], []]
    for b, (p, pos) in enumerate(zip(prompts, positions)):
        pad = width - len(p)
        ids[b, pad:], mask[b, pad:] = p, 1
        for i in range(2):
            locs[i].append([x + pad for x in pos[i]])
    return ids, mask, locs


def reference_greedy(model, ivs, prompt, pos):
    """Greedy decoding by full recomputation, prompt positions edited by plain hooks each step."""
    seq = prompt[None]
    handles = [add_reference_hook(model.model.layers[i], "output", ivs[i], torch.tensor([pos[i]]))
               for i in range(2)]
    try:
        with torch.no_grad():
            for _ in range(NEW):
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
    finally:
        for h in handles:
            h.remove()
    return seq


@pytest.mark.parametrize("use_cache", [True, False])
def test_single_prompt_matches_full_recompute_reference(setup, use_cache):
    model, ivs, reft, prompts, positions = setup
    for prompt, pos in zip(prompts, positions):
        out = one(reft, prompt, pos, use_cache=use_cache)
        assert torch.equal(out, reference_greedy(model, ivs, prompt, pos))
    base = model.generate(input_ids=prompts[0][None], **gen_kwargs())
    assert not torch.equal(base, one(reft, prompts[0], positions[0]))    # the edit matters


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_left_padded_equals_one_by_one(setup, use_cache):
    _, _, reft, prompts, positions = setup
    ids, mask, locs = left_padded(prompts, positions)
    _, out = reft.generate({"input_ids": ids, "attention_mask": mask},
                           unit_locations={"sources->base": (None, locs)}, **gen_kwargs(use_cache=use_cache))
    for b, (prompt, pos) in enumerate(zip(prompts, positions)):
        assert torch.equal(out[b, -NEW:], one(reft, prompt, pos, use_cache=use_cache)[0, -NEW:])


def test_beam_search_batched_equals_one_by_one_and_tensor_path(setup):
    _, _, reft, prompts, positions = setup
    ids, mask, locs = left_padded(prompts, positions)
    _, out = reft.generate({"input_ids": ids, "attention_mask": mask},
                           unit_locations={"sources->base": (None, locs)}, **gen_kwargs(num_beams=3))
    for b, (prompt, pos) in enumerate(zip(prompts, positions)):
        assert torch.equal(out[b, -NEW:], one(reft, prompt, pos, num_beams=3)[0, -NEW:])
    tensor_locs = torch.tensor([[locs[0][b], locs[1][b]] for b in range(len(prompts))])   # (B, n_int, P)
    out2 = reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=tensor_locs,
                         **gen_kwargs(num_beams=3))
    assert torch.equal(out, out2)


@pytest.mark.parametrize("use_cache,expected_calls", [(True, 1), (False, NEW)])
def test_cached_decode_steps_do_not_edit(setup, use_cache, expected_calls, monkeypatch):
    _, ivs, reft, prompts, positions = setup
    calls = []
    for iv in ivs:
        edit = iv.edit
        monkeypatch.setattr(iv, "edit", lambda *a, _edit=edit, **k: calls.append(1) or _edit(*a, **k))
    one(reft, prompts[0], positions[0], use_cache=use_cache)
    assert len(calls) == 2 * expected_calls


def test_generate_rejects_bad_arguments(setup):
    _, _, reft, prompts, positions = setup
    with pytest.raises(ValueError, match="intervene_on_prompt"):
        reft.generate({"input_ids": prompts[0][None]}, unit_locations={"base": 0}, intervene_on_prompt=False)
    with pytest.raises(ValueError, match=r"outside|\[0, 5\)"):
        one(reft, prompts[0], [[5], [0]])


# -- cached generation equals uncached generation (the bug transformers 5.x exposed) ----------
@pytest.mark.parametrize("case", ["edit_at_0", "left_padded", "beams", "every_position"])
def test_cached_generation_equals_uncached(setup, case):
    """The window offset comes from the cache/cache_position/mask, whatever the transformers
    version calls them; an edit at position 0 must not be re-applied to decode tokens."""
    _, _, reft, prompts, positions = setup
    if case == "edit_at_0":
        base, locs = {"input_ids": prompts[1][None]}, [[[0]], [[0, 3]]]
    else:
        ids, mask, locs = left_padded(prompts, positions)
        base = {"input_ids": ids, "attention_mask": mask}
    units = None if case == "every_position" else {"sources->base": (None, locs)}
    extra = {"num_beams": 3} if case == "beams" else {}
    outs = [reft.generate(base, unit_locations=units, **gen_kwargs(use_cache=c, **extra))[1] for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_every_position_means_every_prompt_position(setup):
    """unit_locations=None in generate edits each prompt token, never a generated one."""
    model, ivs, reft, prompts, _ = setup
    prompt = prompts[0]
    every = list(range(len(prompt)))
    _, out = reft.generate({"input_ids": prompt[None]}, unit_locations=None, **gen_kwargs(use_cache=True))
    assert torch.equal(out, reference_greedy(model, ivs, prompt, [every, every]))


def test_window_offset_sources():
    from transformers import DynamicCache
    from reft_kernels.model.patcher import window_offset
    model = torch.nn.Linear(1, 1)
    k = torch.zeros(1, 2, 7, 4)
    assert window_offset((), {"cache_position": torch.tensor([9])}, 1, model) == 9
    assert window_offset((), {"past_key_values": ((k, k),)}, 1, model) == 7          # legacy tuple
    cache = DynamicCache()
    cache.update(k, k, 0)
    for name in ("past_key_values", "cache", "some_future_name"):                     # found by type
        assert window_offset((), {name: cache}, 1, model) == 7
    assert window_offset((), {}, 5, model) == 0                                       # no cache: from 0


def test_window_offset_refuses_to_guess(monkeypatch):
    """A cache whose get_seq_length() is untrusted and no other source: a clear error, not 0."""
    import transformers
    from reft_kernels.model import patcher
    untrusted = type("StaticCache", (transformers.cache_utils.Cache,), {"__init__": lambda self: None})
    cache = untrusted()
    model = torch.nn.Linear(1, 1)
    assert patcher.window_offset((), {"cache": cache, "attention_mask": torch.ones(2, 8)}, 1, model) == 7
    assert patcher.window_offset((), {"cache": cache, "position_ids": torch.tensor([[6]])}, 1, model) == 6
    with pytest.raises(RuntimeError, match=r"Linear.*StaticCache.*transformers"):
        patcher.window_offset((), {"cache": cache}, 1, model)


def test_generate_never_applies_intervention_dropout(tmp_path):
    """Interventions start in training mode; with dropout, greedy generation must still repeat."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         pad_token_id=0)).eval()
    config = pyreft.ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": RANK,
        "intervention": pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.float32,
                                                  dropout=0.5)})
    reft = pyreft.get_reft_model(model, config, backend="torch")
    iv = next(iter(reft.interventions.values()))
    assert iv.training
    prompt = {"input_ids": torch.arange(3, 12)[None]}
    units = {"sources->base": (None, [[[0, 4, 8]]])}
    first = reft.generate(prompt, unit_locations=units, **gen_kwargs())[1]
    assert all(torch.equal(first, reft.generate(prompt, unit_locations=units, **gen_kwargs())[1]) for _ in range(3))
    assert iv.training                                          # the mode is restored afterwards
    reft.save(tmp_path / "ck")
    loaded = pyreft.ReftModel.load(tmp_path / "ck", model)
    assert not any(m.training for m in loaded.interventions.modules())   # loaded adapters are in eval mode
