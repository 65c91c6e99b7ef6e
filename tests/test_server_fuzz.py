"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis), against a real server on 127.0.0.1
with the tiny model: valid and invalid bodies, headers and paths for every route.

For every generated request: no 5xx at all (the catch-all's 500 would mean an unexpected
exception), every error is OpenAI's shape, and the server answers /health after the run.
Bounded: a fixed number of examples per route, derandomized (the same cases every run), so any
failure reproduces; each one found is kept below as a named regression test.
"""
import collections
import json
import urllib.request

import pytest

from test_server import _start, assets  # noqa: F401 (fixture)

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

EXAMPLES = 25   # per route and mode; about a minute on one loaded core
SEEN = collections.Counter()   # (method path, status) of every fuzzed call


@pytest.fixture(scope="module")
def fuzz_server(assets, tmp_path_factory):  # noqa: F811
    for name in ("fastapi", "uvicorn"):
        pytest.importorskip(name)
    allowed = tmp_path_factory.mktemp("allowed")
    proc, url = _start(["--adapter", f"alpha={assets['runs']['alpha']}", "--served-model-name", "base",
                        "--backend", "torch", "--batch-window-ms", "2", "--enable-runtime-adapters",
                        "--allowed-adapter-dir", str(allowed), "--log-level", "warning"])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _check(status, content_type, text):
    assert status < 500, (status, text[:2000])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, text[:500])
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          database=None)
def test_api_fuzz(case, fuzz_server):
    body = case.body
    if case.path.endswith("completions") and isinstance(body, dict) and isinstance(body.get("model"), str):
        # the schema cannot know the served names: two thirds of the bodies name one, to reach generation
        body["model"] = ("alpha", "base", body["model"])[len(body["model"]) % 3]
    response = case.call(base_url=fuzz_server, timeout=60)
    content_type = response.headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type   # a list in schemathesis 4
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    _check(response.status_code, content_type, response.text)


def test_healthy_after_fuzz(fuzz_server):
    """After the fuzz (same module, runs after it): the fuzz reached generation and validation on both
    generation routes, and the server still answers."""
    print(sorted(SEEN.items()))
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert SEEN[(route, 200)] and SEEN[(route, 400)], sorted(SEEN.items())
    assert urllib.request.urlopen(fuzz_server + "/health", timeout=30).read() == b"ok"
    body = json.dumps({"model": "alpha", "prompt": "the cat", "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(fuzz_server + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"] is not None
