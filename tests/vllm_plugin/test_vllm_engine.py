"""``reft-kernels serve --engine vllm``'s engine: same answers as ReftModel.generate, adapters loaded
and unloaded at runtime in the workers, unknown adapters refused per request."""
import concurrent.futures
import os

import pytest

from fixtures import build_adapters, build_tiny, hf_reference, prompts_for

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("REFT_KERNELS_BACKEND", "torch")
    from reft_kernels.serving.vllm_engine import VllmEngine
    root = str(tmp_path_factory.mktemp("vllm_engine"))
    model = build_tiny(root)
    adapters = build_adapters(model, root)
    engine = VllmEngine(model, max_batch_size=8, max_model_len=256,
                        vllm_args={"enforce_eager": True, "kv_cache_memory_bytes": 1 << 28, "seed": 0})
    engine.load_adapter("last1", adapters["last1"]["path"])
    engine.load_adapter("pyr", adapters["pyr"]["path"])
    engine.start()
    yield engine, model, adapters
    engine.close()


def _run(engine, requests):
    from reft_kernels.serving import GenerationRequest, SamplingParams
    futures = [engine.submit(GenerationRequest(p, n, SamplingParams(max_tokens=MAX_TOKENS))) for p, n in requests]
    concurrent.futures.wait(futures, timeout=300)
    return futures


def test_engine_matches_hf_and_runtime_adapters(engine_setup):
    from transformers import AutoTokenizer
    from reft_kernels.serving import UnknownAdapterError
    engine, model, adapters = engine_setup
    prompts = prompts_for(AutoTokenizer.from_pretrained(model), 6)
    engine.load_adapter("fl3", adapters["fl3"]["path"])            # at runtime, into the running workers
    names = [None, "last1", "fl3", "pyr", "last1", "fl3"]
    requests = list(zip(prompts, names))
    reference = hf_reference(model, adapters, requests, MAX_TOKENS)
    futures = _run(engine, requests + [(prompts[0], "nope")])
    got = [f.result().token_ids for f in futures[:-1]]
    # an eos (id 3) may end a vLLM answer early, where the reference (min_new_tokens) must go on:
    # compare up to the eos
    got = [g[:g.index(3)] if 3 in g else g for g in got]
    assert [r[:len(g)] for r, g in zip(reference, got)] == got and all(g for g in got)
    with pytest.raises(UnknownAdapterError):
        futures[-1].result()
    engine.unload_adapter("fl3")
    with pytest.raises(UnknownAdapterError):
        _run(engine, [(prompts[2], "fl3")])[0].result()
    again = _run(engine, [(prompts[1], "last1")])[0].result().token_ids
    assert again[:len(got[1])] == got[1]


def test_http_surface_on_vllm(engine_setup):
    """The same OpenAI routes over the vLLM engine: model = adapter name, streaming, 404 for an unknown
    adapter; the completion equals the engine's direct answer."""
    from fastapi.testclient import TestClient
    from reft_kernels.serving.app import create_app
    engine, model, adapters = engine_setup
    prompt = "the cat sat on the mat and ran to the big red house"
    ids = list(engine.tokenizer(prompt)["input_ids"])
    direct = _run(engine, [(ids, "last1")])[0].result()
    engine.close()          # the app's lifespan starts and stops the engine itself
    with TestClient(create_app(engine, "base", 256)) as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "last1" in models and "base" in models
        r = client.post("/v1/completions", json={"model": "last1", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == direct.text
        with client.stream("POST", "/v1/completions", json={"model": "last1", "prompt": prompt, "stream": True,
                                                            "max_tokens": MAX_TOKENS, "temperature": 0}) as s:
            body = "".join(s.iter_text())
        assert "data: [DONE]" in body
        r = client.post("/v1/completions", json={"model": "nope", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    engine.start()
