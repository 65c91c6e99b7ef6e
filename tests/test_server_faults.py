"""The server never lets one request hurt another, and always answers in OpenAI's error shape.

Poison requests (inputs that failed whole batches or crashed the HTTP layer before) are sent in
the same batch as good requests, several times; the good ones must succeed and equal their solo
answers (the independent path: ``ReftModel.generate`` on a fresh base, see test_server.reference).
Engine tests run in process; HTTP tests against a real uvicorn process or the app in process.
"""
import concurrent.futures
import json
import math
import os
import threading
import urllib.request

import pytest
import torch

from reft_kernels.serving.launch import free_port, http_client_module
from test_server import PROMPTS, _ids, _start, _text, _tok, assets, reference  # noqa: F401 (fixture)

try:
    import openai
except ImportError:
    openai = None


def _httpx():
    try:
        return http_client_module()
    except ImportError as e:
        pytest.skip(str(e))


def _engine(assets, names=("alpha", "beta")):
    from transformers import AutoModelForCausalLM

    from reft_kernels.serving import Engine
    engine = Engine(AutoModelForCausalLM.from_pretrained(assets["base"]).eval(), _tok(assets["base"]), backend="torch")
    for name in names:
        engine.load_adapter(name, assets["runs"][name])
    return engine


# -- sampling: every representable setting is well defined ------------------------------------------
def test_sample_token_extremes_are_the_greedy_limit():
    from reft_kernels.serving.rows import sample_token
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50) * 30
        g = torch.Generator().manual_seed(1)
        top = int(logits.argmax())
        assert sample_token(logits, 1e-40, 1.0, g) == top
        assert sample_token(logits, 1e-300, 1.0, g) == top
        assert sample_token(logits, 1.0, 1e-300, g) == top
        assert sample_token(logits.half(), 5e-324, 0.5, g) == top   # the smallest positive float64
    masked = torch.full((10,), float("-inf"))
    masked[3], masked[7] = 1.0, 0.5
    assert sample_token(masked, 1e-40, 1.0, torch.Generator().manual_seed(0)) == 3
    with pytest.raises(FloatingPointError):
        sample_token(torch.full((5,), float("nan")), 1.0, 1.0, torch.Generator())


def test_sample_token_matches_softmax_distribution():
    """At ordinary settings the float64 sampler draws from softmax(logits / t) cut to the nucleus."""
    from reft_kernels.serving.rows import sample_token
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    t, top_p, n = 0.7, 0.9, 20000
    p = torch.softmax(logits.double() / t, 0)
    keep = (torch.cumsum(p, 0) - p) < top_p          # sorted already: the nucleus
    want = torch.where(keep, p, torch.zeros_like(p))
    want = want / want.sum()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, t, top_p, g) for _ in range(n)]), minlength=5)
    got = counts.double() / n
    assert torch.all((got - want).abs() <= 4 * torch.sqrt(want * (1 - want) / n) + 1e-12), (got, want)


def test_sampling_params_validate_up_front():
    from reft_kernels.serving import SamplingParams
    SamplingParams(max_tokens=1, temperature=1e-40, top_p=1e-300, seed=-2**63)
    SamplingParams(max_tokens=1, seed=2**63 - 1)
    for bad, name in ((dict(seed=2**64), "seed"), (dict(seed=2**63), "seed"), (dict(seed=-2**63 - 1), "seed"),
                      (dict(temperature=math.inf), "temperature"), (dict(temperature=math.nan), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_p=math.nan), "top_p"), (dict(max_tokens=0), "max_tokens")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{"max_tokens": 1, **bad})


# -- engine: a failing row fails alone ---------------------------------------------------------------
def _good_requests(assets):
    from reft_kernels.serving import GenerationRequest, SamplingParams
    jobs = [(PROMPTS[0], None), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "alpha")]
    return jobs, [GenerationRequest(_ids(assets, p), m, SamplingParams(max_tokens=5)) for p, m in jobs]


def _check_good(assets, jobs, results):
    for (p, m), r in zip(jobs, results):
        assert not isinstance(r, BaseException), (p, m, r)
        want = reference(assets, m, _ids(assets, p), 5)
        assert r.token_ids[:len(want)] == want, (p, m)


def test_engine_poison_rows_fail_alone(assets):
    """Each poison batched with four good requests, three times: the good ones equal their solo
    (direct generate) answers; extreme-but-valid sampling is the greedy answer; a row whose
    streaming callback raises fails alone; a row that makes the whole batched generate raise
    (injected fault in the model) fails alone after the batch is rerun row by row."""
    from reft_kernels.serving import GenerationRequest, SamplingParams
    engine = _engine(assets)
    poison_token = _ids(assets, "why")[0]

    def explode(ids):   # a model fault that one request's prompt triggers
        if bool((ids == poison_token).any()):
            raise RuntimeError("injected fault")
    handle = engine.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: explode(args[0]))

    def bad_callback(text, done, reason):
        raise ConnectionResetError("client went away")

    prompt = _ids(assets, PROMPTS[1])
    poisons = {
        "tiny temperature": (GenerationRequest(prompt, "alpha", SamplingParams(max_tokens=5, temperature=1e-40, seed=1)), None),
        "tiny top_p": (GenerationRequest(prompt, "alpha", SamplingParams(max_tokens=5, temperature=1.0, top_p=1e-300)), None),
        "callback raises": (GenerationRequest(prompt, "beta", SamplingParams(max_tokens=5), on_delta=bad_callback),
                            ConnectionResetError),
        "model raises": (GenerationRequest(_ids(assets, "why is the cat"), "alpha", SamplingParams(max_tokens=5)),
                         RuntimeError),
    }
    greedy = reference(assets, "alpha", prompt, 5)
    try:
        for _ in range(3):
            for name, (poison, error) in poisons.items():
                jobs, good = _good_requests(assets)
                poison = GenerationRequest(poison.prompt_ids, poison.adapter, poison.params, poison.on_delta)
                results = engine.generate_batch(good[:2] + [poison] + good[2:], return_exceptions=True)
                _check_good(assets, jobs, results[:2] + results[3:])
                if error is None:
                    assert results[2].token_ids[:len(greedy)] == greedy, name
                else:
                    assert isinstance(results[2], error), (name, results[2])
    finally:
        handle.remove()
    assert engine.stats["failed_requests"] == 6


def test_engine_abandoned_row_stops_early(assets):
    """A row nobody waits for any more (its stream was closed) ends at its next token; the others
    in its batch are unaffected."""
    from reft_kernels.serving import GenerationRequest, SamplingParams
    engine = _engine(assets)
    prompt = _ids(assets, PROMPTS[1])
    want = reference(assets, "alpha", prompt, 10)
    assert len(want) >= 3   # the test needs an answer longer than one token
    gone = GenerationRequest(prompt, "alpha", SamplingParams(max_tokens=10))
    gone.on_delta = lambda text, done, reason: setattr(gone, "abandoned", True)   # the client leaves
    jobs, good = _good_requests(assets)
    results = engine.generate_batch([gone] + good)
    assert results[0].token_ids == want[:1] and results[0].finish_reason == "abort"
    _check_good(assets, jobs, results[1:])


def test_engine_queue_answers_innocents_and_fails_the_poison(assets):
    """Through the batching worker (futures): a batch with a failing row sets that future's
    exception only."""
    from reft_kernels.serving import GenerationRequest, SamplingParams
    engine = _engine(assets, names=("alpha",))
    engine.batch_window_s = 0.2
    engine.start()
    try:
        def bad_callback(text, done, reason):
            raise ValueError("boom")
        jobs, good = _good_requests(assets)
        jobs, good = jobs[:2], good[:2]
        poison = GenerationRequest(_ids(assets, PROMPTS[2]), None, SamplingParams(max_tokens=5), on_delta=bad_callback)
        futures = [engine.submit(r) for r in (good[0], poison, good[1])]
        results = [f.exception(timeout=120) or f.result() for f in futures]
        assert len({r.batch_id for r in (results[0], results[2])}) == 1   # they shared the batch
        _check_good(assets, jobs, [results[0], results[2]])
        assert isinstance(results[1], ValueError)
    finally:
        engine.close()


def test_fair_queue_round_robin():
    from reft_kernels.serving.scheduler import Empty, FairQueue
    q = FairQueue()
    for i in range(5):
        q.put(("big", i), group="big")
    q.put(("small", 0), group="small")
    q.put(("own", 0))
    got = [q.get(timeout=0) for _ in range(7)]
    assert got == [("big", 0), ("small", 0), ("own", 0), ("big", 1), ("big", 2), ("big", 3), ("big", 4)]
    with pytest.raises(Empty):
        q.get(timeout=0.01)
    q.put("last")
    q.put(None)
    assert q.get() == "last" and q.get() is None


# -- HTTP: poison requests in the same batch as good ones --------------------------------------------
@pytest.fixture(scope="module")
def server(assets):
    for name in ("openai", "fastapi", "uvicorn"):
        pytest.importorskip(name)
    proc, url = _start(["--adapter", f"alpha={assets['runs']['alpha']}", "--served-model-name", "base",
                        "--backend", "torch", "--batch-window-ms", "300", "--max-batch-size", "16",
                        "--enable-runtime-adapters", "--max-prompts-per-request", "4"])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _post(url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def _oversized(url, chunked):
    """POST a 9 MiB body; the server may answer before reading it all (then it stops reading)."""
    import http.client
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(9 << 20))
    conn.endheaders()
    try:
        if chunked:
            piece = b"a" * (1 << 20)
            for _ in range(9):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
    except OSError:
        pass   # the server answered and closed mid-body: read its answer
    r = conn.getresponse()
    out = r.status, r.read().decode("utf-8")
    conn.close()
    return out


def _assert_error(status, text, want_status, param="any"):
    assert status == want_status, (status, text)
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("server_error" if want_status >= 500 else "invalid_request_error"), err
    if param != "any":
        assert err["param"] == param, err
    return err


CTX = 64   # the tiny tokenizer's model_max_length = the served context


def _chat_len(assets, content):
    tok = _tok(assets["base"])
    return len(tok(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True))["input_ids"])


def _poisons(assets):
    """name -> (path, body, expected status, expected param); None status = a good answer."""
    at_ctx = "the " * (CTX - _chat_len(assets, ""))
    assert _chat_len(assets, at_ctx) == CTX
    return {**POISONS, "chat prompt at the context, no max_tokens": ("/v1/chat/completions", {
        "model": "alpha", "messages": [{"role": "user", "content": at_ctx}]}, 400, "messages")}


POISONS = {
    "temperature 1e-40": ("/v1/completions", {"model": "alpha", "prompt": PROMPTS[1], "max_tokens": 5,
                                              "temperature": 1e-40, "seed": 3}, None, None),
    "top_p 1e-300": ("/v1/completions", {"model": "alpha", "prompt": PROMPTS[1], "max_tokens": 5,
                                         "temperature": 1.0, "top_p": 1e-300}, None, None),
    "seed 2**64": ("/v1/completions", {"model": "alpha", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1.0,
                                       "seed": 2**64}, 400, "seed"),
    "surrogate prompt": ("/v1/completions", {"model": "alpha", "prompt": "the \ud800 cat", "max_tokens": 5}, 400,
                         "prompt"),
    "surrogate content": ("/v1/chat/completions", {"model": "alpha", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi \ud800"}]}, 400, "messages.0.content"),
    "surrogate model": ("/v1/completions", {"model": "alp\ud800ha", "prompt": "the cat", "max_tokens": 5}, 400,
                        "model"),
    "chat prompt over the context, no max_tokens": ("/v1/chat/completions", {"model": "alpha", "messages": [
        {"role": "user", "content": "the cat " * 40}]}, 400, "messages"),
    "too many prompts": ("/v1/completions", {"model": "alpha", "prompt": ["the cat"] * 5, "max_tokens": 2}, 400,
                         "prompt"),
}


def test_poison_requests_do_not_hurt_their_batch(server, assets):
    """Each poison sent together with four good requests (they share a 300 ms batching window),
    three rounds; the good ones equal their solo answers, the poison gets its own answer."""
    good = [("base", PROMPTS[0]), ("alpha", PROMPTS[1]), ("alpha", PROMPTS[2]), ("base", PROMPTS[3])]
    wants = [_text(assets, reference(assets, None if m == "base" else m, _ids(assets, p), 5)) for m, p in good]
    alpha_greedy = _text(assets, reference(assets, "alpha", _ids(assets, PROMPTS[1]), 5))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            for name, (path, body, status, param) in _poisons(assets).items():
                futs = [pool.submit(_post, server, "/v1/completions",
                                    {"model": m, "prompt": p, "max_tokens": 5, "temperature": 0}) for m, p in good]
                poison = pool.submit(_post, server, path, body)   # json.dumps writes \ud800 as an escape
                for (m, p), want, fut in zip(good, wants, futs):
                    code, text = fut.result()
                    assert code == 200, (name, code, text)
                    assert json.loads(text)["choices"][0]["text"] == want, (name, m, p)
                code, text = poison.result()
                if status is None:
                    assert code == 200 and json.loads(text)["choices"][0]["text"] == alpha_greedy, (name, text)
                else:
                    _assert_error(code, text, status, param)


def test_error_shapes(server, assets, tmp_path):
    """Every input that used to give a plain-text 500 or a leaky message: status and OpenAI shape."""
    err = _assert_error(*_post(server, "/v1/completions", None, raw=b'{"model": "alpha", "prompt": '), 400, None)
    assert "invalid request body" in err["message"]
    _assert_error(*_post(server, "/v1/completions", {"model": "alpha", "prompt": "x", "temperature": "NaN"}), 400,
                  "temperature")
    # a reft_run.json holding a JSON list; a missing path; a file; a directory without reft_run.json
    listed = tmp_path / "listed"
    (listed / "adapter").mkdir(parents=True)
    (listed / "reft_run.json").write_text("[1, 2]")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    messages = set()
    for path in (listed, tmp_path / "missing", tmp_path / "file", tmp_path / "empty"):
        err = _assert_error(*_post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)}), 400,
                            "lora_path")
        messages.add(err["message"])
    assert len(messages) == 1, messages   # one answer: the client cannot map the server's disk
    for chunked in (False, True):   # a declared length over 8 MiB; a chunked body that grows past it
        assert _assert_error(*_oversized(server, chunked), 413)["code"] == "request_too_large"
    assert urllib.request.urlopen(server + "/health").read() == b"ok"


def test_debug_routes_and_paths_hidden_by_default(server, assets):
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": assets["runs"]["gamma"]})
    assert status == 200, text
    models = json.load(urllib.request.urlopen(server + "/v1/models"))
    assert str(assets["root"]) not in json.dumps(models)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server + "/debug/stats")
    assert e.value.code == 404 and "error" in json.loads(e.value.read())
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"})[0] == 200


def test_keep_alive_survives_a_bad_request(server):
    """One client, one connection: a request that used to crash the handler, then a good one."""
    httpx = _httpx()
    with httpx.Client(base_url=server, timeout=120) as http:
        bad = http.post("/v1/completions", content=b'{"model": "alpha", "prompt": "\\ud800"}',
                        headers={"content-type": "application/json"})
        _assert_error(bad.status_code, bad.text, 400, "prompt")
        good = http.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 2})
        assert good.status_code == 200
        assert bad.extensions["network_stream"] is good.extensions["network_stream"]   # the same connection


# -- in process: the catch-all, the API key -------------------------------------------------------------
class _FaultyTokenizer:
    """The real tokenizer, except that encoding a text containing "boom" raises (an injected bug)."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, *a, **k):
        if "boom" in text:
            raise RuntimeError("injected tokenizer bug")
        return self._tok(text, *a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)


def _app(assets, **options):
    pytest.importorskip("fastapi")
    from reft_kernels.serving.app import create_app
    from reft_kernels.serving.options import ServeOptions
    engine = _engine(assets, names=("alpha",))
    engine.tokenizer = _FaultyTokenizer(engine.tokenizer)
    return create_app(engine, "base", 64, options=ServeOptions(**options))


def test_unexpected_errors_are_openai_500_and_the_connection_lives(assets, caplog):
    """An injected bug in the handler: a 500 in OpenAI's shape, logged with the request id, and the
    next request on the same keep-alive connection of a real uvicorn server is answered."""
    uvicorn = pytest.importorskip("uvicorn")
    httpx = _httpx()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(assets), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for _ in range(200):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    threading.Event().wait(0.1)
            bad = http.post("/v1/completions", json={"model": "alpha", "prompt": "boom", "max_tokens": 2})
            err = _assert_error(bad.status_code, bad.text, 500, None)
            assert err["code"] is None and bad.headers["x-request-id"] in err["message"]
            assert any(bad.headers["x-request-id"] in r.getMessage() for r in caplog.records)
            good = http.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 2})
            assert good.status_code == 200 and good.json()["choices"][0]["text"]
            assert bad.extensions["network_stream"] is good.extensions["network_stream"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_api_key(assets, monkeypatch):
    """With a key: the openai client with the right key works, a wrong or missing key gets
    AuthenticationError (401, OpenAI shape), /health stays open. The key can come from the
    environment (REFT_KERNELS_API_KEY, else vLLM's VLLM_API_KEY)."""
    if openai is None:
        pytest.skip("openai")
    TestClient = pytest.importorskip("fastapi.testclient").TestClient
    from reft_kernels.serving.server import build_parser, serve_options
    with TestClient(_app(assets, api_key="s3cret")) as http:
        right = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=http, max_retries=0)
        assert [m.id for m in right.models.list().data] == ["base", "alpha"]
        assert right.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2, temperature=0).choices[0].text
        wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="guess", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key" and e.value.status_code == 401
        r = http.get("/v1/models")
        _assert_error(r.status_code, r.text, 401)
        assert http.get("/health").text == "ok"
    args = build_parser().parse_args(["--model", "m"])
    monkeypatch.delenv("REFT_KERNELS_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert serve_options(args).api_key == "from-vllm"
    monkeypatch.setenv("REFT_KERNELS_API_KEY", "ours")
    assert serve_options(args).api_key == "ours"
    assert serve_options(build_parser().parse_args(["--model", "m", "--api-key", "flag"])).api_key == "flag"


def test_allowed_adapter_dir(assets, tmp_path):
    """Runtime loads only below --allowed-adapter-dir, symlinks resolved; outside: the one message."""
    TestClient = pytest.importorskip("fastapi.testclient").TestClient
    from reft_kernels.serving.app import ADAPTER_NOT_LOADABLE
    inside = tmp_path / "allowed"
    inside.mkdir()
    os.symlink(assets["runs"]["beta"], inside / "beta_link")   # points outside: refused
    app = _app(assets, allowed_adapter_dir=str(assets["root"]))
    app.state.server.runtime_adapters = True
    with TestClient(app) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": assets["runs"]["gamma"]})
        assert r.status_code == 200, r.text
    app = _app(assets, allowed_adapter_dir=str(inside))
    app.state.server.runtime_adapters = True
    with TestClient(app) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(inside / "beta_link")})
        assert _assert_error(r.status_code, r.text, 400, "lora_path")["message"] == ADAPTER_NOT_LOADABLE


def test_token_limit_names_the_flag(assets):
    TestClient = pytest.importorskip("fastapi.testclient").TestClient
    with TestClient(_app(assets, max_tokens_per_request=30)) as http:
        ok = http.post("/v1/completions", json={"model": "alpha", "prompt": [[5] * 10] * 2, "max_tokens": 5})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2   # 2 * (10 + 5) = 30 tokens
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": [[5] * 10] * 2, "max_tokens": 6})
        err = _assert_error(r.status_code, r.text, 400, "max_tokens")
        assert "--max-tokens-per-request" in err["message"] and "32" in err["message"]
        # chat without max_tokens: the default (the rest of the context) stays within the limit
        r = http.post("/v1/chat/completions", json={"model": "alpha", "temperature": 0,
                                                     "messages": [{"role": "user", "content": "the cat sat"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] <= 30
