"""vLLM + the reft_kernels plugin == ReftModel.generate (HF), token for token, greedy.

One tiny random Llama (2 layers), four random adapters (l1, f1, untied f3+l3 with two
interventions on one layer, and a pyreft-format checkpoint), eight prompts of 3..25 tokens mixed
with the base model in one batch. Each engine configuration runs in its own process:

* prefix caching on (block size 32, the CPU backend's unit): the batch twice (the second time from
  the cache), then the salt check: a 64-token prompt and a 72-token prompt extending it, same
  last-token adapter;
* prefix caching off;
* chunked prefill with max_num_batched_tokens=16 (prompts longer than one chunk).

Decode-time edits (``reft_generated_positions``: every token, every 2nd, given indices) ride the
prefix-cache and no-cache engines as one more batch each.
"""
import os

import pytest

from fixtures import ADAPTERS, build_adapters, build_tiny, hf_reference, prompts_for, run_vllm

from reft_kernels.vllm_plugin import cache_salt

MAX_TOKENS = 8
NAMES = [None, "last1", "first1", "fl3", "pyr"]


GENERATED = [("last1", "all"), ("first1", 2), ("fl3", [1, 3]), (None, None)]


def _gen_requests(requests):
    return [(p, name, g) for (p, _), (name, g) in zip(requests, GENERATED)]


def _gen_batch(gen, adapters):
    return [{"ids": p, "adapter": n, "generated": g,
             "salt": cache_salt(n, adapters[n]["positions"], len(p), generated=g) if n else None} for p, n, g in gen]


@pytest.fixture(scope="module")
def gen_reference(setup):
    """HF answers with decode-time edits; each rule changes its answer beyond the prompt edit alone."""
    model, adapters, requests, _, _ = setup
    gen = _gen_requests(requests)
    reference = hf_reference(model, adapters, gen, MAX_TOKENS)
    prompt_only = hf_reference(model, adapters, [(p, n) for p, n, _ in gen], MAX_TOKENS)
    assert all(r != o for r, o, (_, n, _) in zip(reference, prompt_only, gen) if n), "decode edits must matter"
    return gen, reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer
    root = str(tmp_path_factory.mktemp("vllm_plugin"))
    model = build_tiny(root)
    adapters = build_adapters(model, root)
    prompts = prompts_for(AutoTokenizer.from_pretrained(model))
    requests = [(p, NAMES[i % len(NAMES)]) for i, p in enumerate(prompts)]
    reference = hf_reference(model, adapters, requests, MAX_TOKENS)
    base = hf_reference(model, adapters, [(p, None) for p, _ in requests], MAX_TOKENS)
    return model, adapters, requests, reference, base


def _batch(requests, adapters, salted=True):
    return [{"ids": p, "adapter": n,
             "salt": cache_salt(n, adapters[n]["positions"], len(p)) if n and salted else None}
            for p, n in requests]


def test_edits_change_the_reference(setup):
    """Each adapter changes the HF answer of at least one of its prompts (the base requests none), so
    the equalities below compare edited generations, not the base model's."""
    _, _, requests, reference, base = setup
    changed = {}
    for (p, name), ref, b in zip(requests, reference, base):
        if name is None:
            assert ref == b
        else:
            changed[name] = changed.get(name, False) or ref != b
    assert changed == {name: True for name in ADAPTERS}, changed


def test_prefix_cache_and_salt(setup, gen_reference):
    model, adapters, requests, reference, _ = setup
    gen, gen_ref = gen_reference
    long = [sum((p for p, _ in requests), [])[:72]]             # 72 tokens
    short = [long[0][:64]]                                      # its first two 32-token blocks
    ref_long = hf_reference(model, adapters, [(long[0], "last1")], MAX_TOKENS)[0]
    salted = lambda ids: [{"ids": ids, "adapter": "last1", "salt": cache_salt("last1", "l1", len(ids))}]  # noqa: E731
    bare = lambda ids: [{"ids": ids, "adapter": "last1"}]  # noqa: E731
    out = run_vllm({"model": model, "adapters": adapters, "max_tokens": MAX_TOKENS,
                    "engine": {"enable_prefix_caching": True, "block_size": 32},
                    "batches": [_batch(requests, adapters), _batch(requests, adapters),
                                salted(short[0]), salted(long[0]), bare(short[0]), bare(long[0]),
                                _gen_batch(gen, adapters)]})["outputs"]
    assert out[6] == gen_ref, "decode-time edits, prefix caching on"
    assert out[0] == reference, "first pass (cache cold)"
    assert out[1] == reference, "second pass (prompts from the prefix cache)"
    assert out[3] == [ref_long], "salted: the longer prompt does not reuse the shorter one's edited block"
    # Without the salt the 72-token prompt reuses the 64-token prompt's blocks, whose last token
    # (position 63) carries that prompt's l1 edit: the answer is wrong. This is what the salt prevents.
    assert out[5] != [ref_long]


def test_no_prefix_cache(setup, gen_reference):
    model, adapters, requests, reference, _ = setup
    gen, gen_ref = gen_reference
    out = run_vllm({"model": model, "adapters": adapters, "max_tokens": MAX_TOKENS,
                    "engine": {"enable_prefix_caching": False},
                    "batches": [_batch(requests, adapters, salted=False), _gen_batch(gen, adapters)]})["outputs"]
    assert out[0] == reference
    assert out[1] == gen_ref, "decode-time edits, prefix caching off"


def test_chunked_prefill(setup):
    model, adapters, requests, reference, _ = setup
    out = run_vllm({"model": model, "adapters": adapters, "max_tokens": MAX_TOKENS,
                    "engine": {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, "max_num_seqs": 8,
                               "enable_prefix_caching": False},
                    "batches": [_batch(requests, adapters, salted=False)]})["outputs"]
    assert out[0] == reference
