"""The real model (SmolLM2-135M-Instruct, fp32): vLLM + plugin == ReftModel.generate, token for token.

One batch of 8 chat prompts of different lengths (31..64 tokens) over the base model and three
adapters, two requests each: ``l1`` (LoReFT at layer 15, our checkpoint format), ``f1`` (NoReFT at
layer 5, ours) and ``fl3`` (untied f3+l3 LoReFT, two interventions at layer 10, pyreft's format).
Two engines, each started once for the module (a subprocess each; an engine start is most of
this test's cost):

* prefix caching on and chunked prefill with ``max_num_batched_tokens=32`` (every prompt is split
  into chunks, and a step mixes chunks of several requests): the batch cold, then again with its
  prompts' blocks served from the prefix cache (salted);
* prefix caching off, unchunked (``max_num_batched_tokens=512``: the whole batch in one step).

Needs the model (``reft-kernels fetch-model``; CI fetches it before the main suite).
"""
import pytest

from fixtures import build_adapters, hf_reference, run_vllm

from reft_kernels.vllm_plugin import cache_salt

REAL_ADAPTERS = {
    "l1": ("l1", False, [15], "LoreftIntervention", 4, "ours"),
    "f1": ("f1", False, [5], "NoreftIntervention", 2, "ours"),
    "fl3": ("f3+l3", False, [10, 10], "LoreftIntervention", 4, "pyreft"),
}
NAMES = [None, "l1", "f1", "fl3"] * 2
TEXTS = ["Hi", "What is the capital of France?", "Write one short sentence about the sea.",
         "List three colors of the rainbow, separated by commas, and nothing else.",
         "Name a fruit.", "Explain in two short sentences why the sky looks blue during the day.",
         "Translate 'good morning' into Spanish, French and German, one per line, without any explanation.",
         "What is two plus two? Answer with a number only, and then describe the number in exactly three "
         "words, and after that name one famous mathematician who worked on arithmetic."]
MAX_TOKENS = 6
ENGINES = {
    "prefix caching on + chunked prefill (max_num_batched_tokens=32)": {
        "enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 32},
    # 512 >= the whole batch (~350 tokens): one prefill step; smaller than the default, so vLLM's
    # start-up profiling run is cheaper
    "prefix caching off, unchunked": {"enable_prefix_caching": False, "max_num_batched_tokens": 512},
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from reft_kernels.base_models.real import cached_model_dir
    model = cached_model_dir()
    if model is None:
        pytest.skip("SmolLM2-135M-Instruct is not cached; run reft-kernels fetch-model")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    adapters = build_adapters(model, str(tmp_path_factory.mktemp("vllm_real")), REAL_ADAPTERS)
    prompts = []
    for t in TEXTS:
        p = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        prompts.append(list(p["input_ids"]) if hasattr(p, "keys") else list(p))
    requests = list(zip(prompts, NAMES))
    reference = hf_reference(model, adapters, requests, MAX_TOKENS)
    base = hf_reference(model, adapters, [(p, None) for p in prompts], MAX_TOKENS)
    batch = [{"ids": p, "adapter": n, "salt": cache_salt(n, adapters[n]["positions"], len(p)) if n else None}
             for p, n in requests]
    outputs = {}
    for label, engine in ENGINES.items():
        batches = [batch, batch] if engine["enable_prefix_caching"] else [batch]
        outputs[label] = run_vllm({"model": model, "adapters": adapters, "max_tokens": MAX_TOKENS,
                                   "engine": {"max_model_len": 512, **engine}, "batches": batches},
                                  timeout=600)["outputs"]
    return prompts, reference, base, outputs


def test_real_prompts_and_edits(real):
    """8 prompts of different lengths; every adapter changes the answer of at least one of its
    prompts (so the equalities compare edited answers, not the base model's)."""
    prompts, reference, base, _ = real
    assert len(prompts) == 8 and len({len(p) for p in prompts}) == 8
    changed = {n: any(r != b for r, b, m in zip(reference, base, NAMES) if m == n) for n in REAL_ADAPTERS}
    assert changed == {n: True for n in REAL_ADAPTERS}, changed
    assert all(r == b for r, b, m in zip(reference, base, NAMES) if m is None)


@pytest.mark.parametrize("label", list(ENGINES))
def test_real_model_equals_hf(real, label):
    _, reference, _, outputs = real
    for i, out in enumerate(outputs[label]):
        equal = sum(o == r for o, r in zip(out, reference))
        print(f"{label}, {('cold', 'from the prefix cache')[i]}: {equal}/{len(reference)} prompts equal")
        assert out == reference, f"{label}, pass {i}"
