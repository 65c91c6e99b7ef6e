"""``reft-kernels serve`` end to end: a real uvicorn process, the official ``openai`` client.

Independent path: each answer is compared with ``ReftModel.generate`` run directly (greedy, one
prompt, no padding) on a fresh copy of the base model with that adapter alone.
"""
import functools
import json
import signal
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

from reft_kernels.serving.launch import free_port, launch_server

try:   # the HTTP tests need the server's extra dependencies; the engine tests run without them
    import openai
except ImportError:
    openai = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a cat dog sat on mat red blue green one two three four five six seven eight nine ten "
         "what is capital of italy france rome paris say hello world yes no and or why how when "
         "instruction response user assistant system : ### . , ? ! big small fast slow up down").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
# name -> (layers, positions, share_weights, rank, seed)
ADAPTERS = {"alpha": ([0, 1], "l1", False, 4, 1), "beta": ([1, 1], "f1+l2", False, 2, 2),
            "gamma": ([0], "f2+l2", True, 3, 3)}
PROMPTS = ["the cat sat on the mat", "what is the capital of italy ?", "one two three",
           "say hello world and the dog sat"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    return tok




@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + word tokenizer on disk, and three strong random LoReFT adapters (run dirs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reft_kernels import LoreftIntervention, ReftConfig, get_reft_model
    root = tmp_path_factory.mktemp("serve")
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    for name, (layers, positions, share, rank, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        reps = [{"layer": i, "component": "block_output", "low_rank_dimension": rank,
                 "intervention": LoreftIntervention(embed_dim=32, low_rank_dimension=rank, dtype=torch.float32)}
                for i in layers]
        rm = get_reft_model(model, ReftConfig(representations=reps))
        with torch.no_grad():
            for iv in rm.interventions.values():   # strong edits: each adapter changes the greedy answer
                iv.learned_source.weight.normal_(0, 2.0)
                iv.learned_source.bias.normal_(0, 8.0)
        run = root / name
        rm.save(str(run / "adapter"))
        (run / "reft_run.json").write_text(json.dumps({
            "model": str(base), "positions": positions, "num_interventions": len(reps),
            "share_weights": share, "template": "instruction"}))
        rm.unload()
    return {"root": root, "base": str(base), "runs": {n: str(root / n) for n in ADAPTERS}}


@functools.lru_cache(maxsize=None)
def _base_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()


@functools.lru_cache(maxsize=None)
def _tok(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _text(assets, ids):
    return _tok(assets["base"]).decode(ids, skip_special_tokens=True)


def reference(assets, adapter, prompt_ids, max_new_tokens):
    """ReftModel.generate on a fresh base with ``adapter`` alone (or the plain base), greedy."""
    from reft_kernels import ReftModel
    from reft_kernels.data.datasets import get_intervention_locations
    base = _base_model(assets["base"])
    ids = torch.tensor([prompt_ids])
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=3,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        if adapter is None:
            out = base.generate(ids, **kw)
        else:
            layers, positions, share, _, _ = ADAPTERS[adapter]
            rm = ReftModel.load(os.path.join(assets["runs"][adapter], "adapter"), base, backend="torch")
            locs = get_intervention_locations(last_position=len(prompt_ids), positions=positions,
                                              num_interventions=len(layers), share_weights=share)
            width = max(map(len, locs))
            locs = torch.tensor([[r + [-1] * (width - len(r)) for r in locs]])
            out = rm.generate(input_ids=ids, intervention_locations=locs, **kw)
            rm.unload()
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(3)] if 3 in new else new


def _start(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env_extra or {})}
    return launch_server(args, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def server(assets):
    for name in ("openai", "fastapi", "uvicorn"):
        pytest.importorskip(name)
    args = [a for n, p in list(assets["runs"].items())[:2] for a in ("--adapter", f"{n}={p}")]
    proc, url = _start([*args, "--served-model-name", "base", "--backend", "torch", "--batch-window-ms", "300",
                        "--max-batch-size", "8", "--enable-runtime-adapters", "--debug"])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ids(assets, text):
    return _tok(assets["base"])(text)["input_ids"]


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "alpha", "beta"]


@pytest.mark.parametrize("model", ["base", "alpha", "beta"])
def test_completion_matches_direct_generate(client, assets, model):
    prompt = PROMPTS[1]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    want = reference(assets, None if model == "base" else model, _ids(assets, prompt), 8)
    assert r.choices[0].text == _text(assets, want)
    assert r.usage.completion_tokens == len(want) + (r.choices[0].finish_reason == "stop")


def test_adapters_differ(client):
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
             for m in ("base", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_concurrent_mixed_adapters_are_batched_and_exact(client, assets, server):
    jobs = [(m, p) for p in PROMPTS for m in ("base", "alpha", "beta")][:8]
    answers, headers = [None] * len(jobs), [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def call(i, model, prompt):
        barrier.wait()
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        answers[i], headers[i] = raw.parse().choices[0].text, raw.headers
    threads = [threading.Thread(target=call, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = [int(h["x-reft-batch-size"]) for h in headers]
    batch_ids = {h["x-reft-batch-id"] for h in headers}
    assert max(sizes) >= 4 and len(batch_ids) < len(jobs), (sizes, batch_ids)   # requests shared batches
    stats = json.load(urllib.request.urlopen(server + "/debug/stats"))
    assert stats["max_batch"] >= 4
    mixed = [b for b in stats["last_batches"] if len(b["adapters"]) > 1]
    assert mixed
    for b in mixed:   # mixed: one generate for the whole batch; grouped: one per adapter in it
        assert b["generate_calls"] == (1 if stats["mode"] == "mixed" else len(b["adapters"])), b
    for (model, prompt), got in zip(jobs, answers):
        want = reference(assets, None if model == "base" else model, _ids(assets, prompt), 6)
        assert got == _text(assets, want), (model, prompt)


def test_chat_uses_chat_template(client, assets):
    r = client.chat.completions.create(model="alpha", temperature=0, max_tokens=6,
                                       messages=[{"role": "user", "content": "what is the capital of italy ?"}])
    tok_text = "user : what is the capital of italy ? . assistant :"
    want = reference(assets, "alpha", _ids(assets, tok_text), 6)
    assert r.choices[0].message.content == _text(assets, want)
    assert r.choices[0].message.role == "assistant"


def test_streaming_completion_and_chat(client):
    full = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=7, temperature=0).choices[0].text
    parts = list(client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=7, temperature=0,
                                           stream=True))
    assert "".join(c.choices[0].text for c in parts) == full
    assert len(parts) >= 2 and parts[-1].choices[0].finish_reason in ("stop", "length")
    msgs = [{"role": "user", "content": "say hello"}]
    chat = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content


def test_sampling_seeded_and_stop(client):
    kw = dict(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    others = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(6)}
    assert len(others) > 1
    greedy = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    words = greedy.choices[0].text.split()
    if len(words) >= 3:
        cut = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                        stop=[" " + words[2]])
        assert cut.choices[0].text == " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"


def test_errors_are_clean_and_others_still_served(client, server):
    results = {}

    def good():
        results["good"] = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the cat", max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="the cat", max_tokens=4, temperature=5)
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="the cat " * 40, max_tokens=10)
    assert "maximum context length is 64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="the cat", max_tokens=2, n=2)
    assert "n=2" in e.value.body["message"]
    req = urllib.request.Request(server + "/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    t.join()
    assert results["good"].choices[0].text


def test_runtime_load_and_unload(client, assets):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=4)
    r = client.post("/load_lora_adapter", cast_to=str, body={"lora_name": "gamma", "lora_path": assets["runs"]["gamma"]})
    assert "gamma" in r
    assert "gamma" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
    want = reference(assets, "gamma", _ids(assets, PROMPTS[0]), 6)
    assert got == _text(assets, want)
    with pytest.raises(openai.BadRequestError):   # already loaded
        client.post("/load_lora_adapter", cast_to=str, body={"lora_name": "gamma", "lora_path": assets["runs"]["gamma"]})
    with pytest.raises(openai.BadRequestError):   # bad path
        client.post("/load_lora_adapter", cast_to=str, body={"lora_name": "delta", "lora_path": "/no/such/dir"})
    client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "gamma"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "gamma"})


def test_runtime_adapters_refused_when_not_enabled(assets):
    """In process (same app, runtime adapters off): the vLLM endpoints answer 404 with how to enable them."""
    TestClient = pytest.importorskip("fastapi.testclient").TestClient

    from reft_kernels.serving.app import create_app
    from reft_kernels.serving.server import build_engine, build_parser
    args = build_parser().parse_args(["--adapter", f"alpha={assets['runs']['alpha']}", "--backend", "torch"])
    engine, served, ctx, root = build_engine(args)
    with TestClient(create_app(engine, served, ctx, enable_runtime_adapters=False)) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": assets["runs"]["gamma"]})
        assert r.status_code == 404 and "--enable-runtime-adapters" in r.json()["error"]["message"]
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
        assert r.status_code == 404
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [assets["base"], "alpha"]


def test_engine_mixed_and_grouped_batches_agree(assets):
    """In process: the same mixed-adapter batch through one generate and through one per adapter."""
    from reft_kernels.serving import Engine, GenerationRequest, SamplingParams
    from transformers import AutoModelForCausalLM
    outs = {}
    for mode in ("mixed", "grouped"):
        engine = Engine(AutoModelForCausalLM.from_pretrained(assets["base"]), _tok(assets["base"]), mode=mode,
                        backend="torch")
        for name in ADAPTERS:
            engine.load_adapter(name, assets["runs"][name])
        reqs = [GenerationRequest(_ids(assets, p), m, SamplingParams(max_tokens=5, temperature=t, seed=3))
                for p in PROMPTS for m, t in ((None, 0.0), ("alpha", 0.0), ("beta", 1.0), ("gamma", 0.0))]
        outs[mode] = [r.token_ids for r in engine.generate_batch(reqs)]
        assert engine.stats["generate_calls"] == (1 if mode == "mixed" else 4)
    assert outs["mixed"] == outs["grouped"]


def _cli_has_serve() -> bool:
    from reft_kernels.cli.main import build_parser
    return "serve" in build_parser()._subparsers._group_actions[0].choices


@pytest.mark.skipif(not _cli_has_serve(), reason="reft_kernels/cli/main.py does not register the serve subcommand yet")
def test_docs_snippet_runs_as_written(tmp_path):
    """The quick-start block of docs/serving.md (= the README snippet), verbatim but for the port,
    with `reft-kernels` and `python` resolving to this checkout."""
    import re
    text = open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8").read()
    block = re.search(r"<!-- serving-snippet:start -->\n```bash\n(.*?)```", text, re.S).group(1)
    port = str(free_port())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("reft-kernels", f"{sys.executable} -m reft_kernels"), ("python", sys.executable)):
        (bin_dir / name).write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
        (bin_dir / name).chmod(0o755)
    # the torch backend: the snippet's commands unchanged, no native build inside a timed test
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "REFT_KERNELS_BACKEND": "torch"}
    proc = subprocess.Popen(["bash", "-e", "-c", block.replace("8000", port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:   # the snippet's background server too, whatever happened
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    last = out.strip().splitlines()
    assert last[-1] == str(["reft_demo/base_model", "demo"]) or last[-1].endswith("'demo']"), last
    assert last[-2].strip(), "the chat reply is empty"


def test_engine_rows_match_direct_generate(assets):
    """In process, no HTTP (also runs under transformers 4.45.1): one batch mixing adapters, prompt
    lengths (left padding), max_tokens and a sampled row; each greedy row equals the direct path."""
    from transformers import AutoModelForCausalLM

    from reft_kernels.serving import Engine, GenerationRequest, SamplingParams
    engine = Engine(AutoModelForCausalLM.from_pretrained(assets["base"]), _tok(assets["base"]), backend="torch")
    for name in ADAPTERS:
        engine.load_adapter(name, assets["runs"][name])
    jobs = [(PROMPTS[i % 4], m, 3 + i % 4) for i, m in enumerate([None, "alpha", "beta", "gamma", "alpha", "gamma"])]
    reqs = [GenerationRequest(_ids(assets, p), m, SamplingParams(max_tokens=k)) for p, m, k in jobs]
    reqs.append(GenerationRequest(_ids(assets, PROMPTS[0]), "beta", SamplingParams(max_tokens=6, temperature=1.0, seed=5)))
    results = engine.generate_batch(reqs)
    assert {r.batch_id for r in results} == {results[0].batch_id}
    for (p, m, k), r in zip(jobs, results):
        want = reference(assets, m, _ids(assets, p), k)
        assert r.token_ids[:len(want)] == want and len(r.token_ids) == min(k, len(want) + 1), (m, p)
        assert r.finish_reason == ("length" if len(want) == k else "stop")
    alone = engine.generate_batch([GenerationRequest(_ids(assets, PROMPTS[0]), "beta",
                                                     SamplingParams(max_tokens=6, temperature=1.0, seed=5))])
    assert alone[0].token_ids == results[-1].token_ids   # a seeded row does not depend on its batch
