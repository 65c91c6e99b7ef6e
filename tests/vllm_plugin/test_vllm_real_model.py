"""The real model (SmolLM2-135M-Instruct, fp32): vLLM + plugin == ReftModel.generate, token for token,
for a few chat prompts of different lengths mixing the base model, a last-token LoReFT adapter at
layer 15 and an untied f3+l3 adapter at layer 10, in one batch with prefix caching on.
Needs the model (``reft-kernels fetch-model``; CI fetches it before the main suite)."""
import pytest

from fixtures import build_adapters, hf_reference, run_vllm

from reft_kernels.vllm_plugin import cache_salt

REAL_ADAPTERS = {
    "l1_15": ("l1", False, [15], "LoreftIntervention", 4, "ours"),
    "fl3_10": ("f3+l3", False, [10, 10], "LoreftIntervention", 4, "pyreft"),
}
MAX_TOKENS = 8


def test_real_model_equals_hf(tmp_path):
    from reft_kernels.models.real import cached_model_dir
    model = cached_model_dir()
    if model is None:
        pytest.skip("SmolLM2-135M-Instruct is not cached; run reft-kernels fetch-model")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    adapters = build_adapters(model, str(tmp_path), REAL_ADAPTERS)
    texts = ["What is the capital of France?", "Write one sentence about the sea.",
             "List three colors of the rainbow, separated by commas, and nothing else.", "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    requests = list(zip(prompts, ["l1_15", None, "fl3_10", "l1_15"]))
    reference = hf_reference(model, adapters, requests, MAX_TOKENS)
    base = hf_reference(model, adapters, [(requests[0][0], None)], MAX_TOKENS)
    assert reference[0] != base[0], "the l1 edit must change the answer (else the equality says nothing)"
    batch = [{"ids": p, "adapter": n, "salt": cache_salt(n, adapters[n]["positions"], len(p)) if n else None}
             for p, n in requests]
    out = run_vllm({"model": model, "adapters": adapters, "max_tokens": MAX_TOKENS,
                    "engine": {"max_model_len": 512}, "batches": [batch]}, timeout=600)["outputs"]
    assert out[0] == reference
