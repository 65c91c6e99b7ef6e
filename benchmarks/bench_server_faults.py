"""Fault load on the real server: 32 concurrent clients mixing adapters, streaming, cancelled streams
and poison requests, on 127.0.0.1 only; and the fairness of the queue.

Setup: a tiny random Llama (d=64, 2 layers, a word-level tokenizer), three LoReFT adapters with
different position rules, ``reft-kernels serve`` as a subprocess (``--batch-window-ms 5``,
``--max-batch-size 16``). Every good request is greedy; its expected text is the answer the same
server gives to that request sent alone, before the load. Each client thread draws its requests
from a fixed mix (seeded):

* good: completion or chat, base model or one of the adapters, non-streaming or streaming;
* cancelled: a stream the client closes after its first event;
* poison: the inputs that used to fail whole batches or crash the handler (``temperature`` 1e-40,
  ``top_p`` 1e-300, ``seed`` 2**64, a lone surrogate in ``prompt`` / ``content`` / ``model``, a chat
  prompt over the context without ``max_tokens``, malformed JSON).

An *innocent failure* is a good request that got no 200 or a text different from its solo answer;
it must be 0. Reported: requests/s, p50/p99 latency of good requests, failures by cause, poison
answers by status, the server's RSS before and after the load.

Fairness: one request with 256 prompts, then 250 ms later (while its first batches run) a
one-prompt request; the small one's latency, against the same request alone
(``--max-prompts-per-request 256`` for this phase).

    python benchmarks/bench_server_faults.py                       # the committed run
    python benchmarks/bench_server_faults.py --code-ref 9c50c54     # the same load on older code
    python benchmarks/bench_server_faults.py --requests 200 --no-write   # a smoke run

Writes benchmarks/results/server_faults.json and server_faults.png (each --code-ref a series).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from reft_kernels.serving.launch import http_client_module, launch_server  # noqa: E402

WORDS = "the a cat dog sat on mat red blue green one two three four five six what is capital of italy why".split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
ADAPTERS = {"a1": ("l1", [0]), "a2": ("f1+l2", [0, 1]), "a3": ("f2+l2", [1, 1])}
MODELS = ["base", *ADAPTERS]


def httpx():
    try:
        return http_client_module()
    except ImportError as e:
        raise SystemExit(str(e))


def make_assets(root: str) -> dict:
    """A tiny Llama + word tokenizer (context 64) and three LoReFT run directories under ``root``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from reft_kernels import LoreftIntervention, ReftConfig, get_reft_model
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", ":", ".",
                                                                     "user", "assistant"] + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3, tie_word_embeddings=False)).eval()
    base = os.path.join(root, "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    runs = {}
    for seed, (name, (positions, layers)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + 1)
        reps = [{"layer": i, "component": "block_output", "low_rank_dimension": 4,
                 "intervention": LoreftIntervention(embed_dim=64, low_rank_dimension=4)} for i in layers]
        rm = get_reft_model(model, ReftConfig(representations=reps))
        with torch.no_grad():
            for iv in rm.interventions.values():
                iv.learned_source.bias.normal_(0, 4.0)
        runs[name] = os.path.join(root, name)
        rm.save(os.path.join(runs[name], "adapter"))
        with open(os.path.join(runs[name], "reft_run.json"), "w") as f:
            json.dump({"model": base, "positions": positions, "num_interventions": len(layers),
                       "share_weights": False, "template": "instruction"}, f)
        rm.unload()
    return {"base": base, "runs": runs}


def start_server(assets: dict, extra=(), pythonpath: str = ROOT):
    """The server of the checkout at ``pythonpath`` (old or new code), its log in the temp dir."""
    args = [a for n, p in assets["runs"].items() for a in ("--adapter", f"{n}={p}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, "REFT_KERNELS_BACKEND": "torch"}
    log = os.path.join(tempfile.gettempdir(), f"reft_server_{os.getpid()}_{time.monotonic_ns()}.log")
    return launch_server([*args, "--served-model-name", "base", "--backend", "torch", "--batch-window-ms", "5",
                          "--max-batch-size", "16", "--log-level", "error", *extra],
                         cwd=pythonpath, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                         log_hint=f"see {log}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# -- the request mix ---------------------------------------------------------------------------------
def good_request(rng: random.Random) -> dict:
    model, chat, stream = rng.choice(MODELS), rng.random() < 0.4, rng.random() < 0.25
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
    body = {"model": model, "max_tokens": rng.randint(2, 10), "temperature": 0, "stream": stream}
    if chat:
        return {"kind": "good", "path": "/v1/chat/completions", "body": {**body, "messages": [{"role": "user", "content": text}]}}
    return {"kind": "good", "path": "/v1/completions", "body": {**body, "prompt": text}}


POISONS = {
    "temperature 1e-40": lambda g: {**g, "body": {**g["body"], "temperature": 1e-40, "seed": 1}},
    "top_p 1e-300": lambda g: {**g, "body": {**g["body"], "temperature": 1.0, "top_p": 1e-300}},
    "seed 2**64": lambda g: {**g, "body": {**g["body"], "temperature": 1.0, "seed": 2**64}},
    "surrogate prompt": lambda g: {"path": "/v1/completions", "body": {"model": "a1", "prompt": "the \ud800", "max_tokens": 4}},
    "surrogate content": lambda g: {"path": "/v1/chat/completions", "body": {
        "model": "a1", "messages": [{"role": "user", "content": "cat \ud800"}], "max_tokens": 4}},
    "surrogate model": lambda g: {"path": "/v1/completions", "body": {"model": "a\ud800", "prompt": "the", "max_tokens": 4}},
    "chat over the context": lambda g: {"path": "/v1/chat/completions", "body": {
        "model": "a2", "messages": [{"role": "user", "content": "the cat " * 40}]}},
    "malformed JSON": lambda g: {"path": "/v1/completions", "raw": b'{"model": "a1", "prompt": '},
}


def make_mix(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            out.append(good_request(rng))
        elif r < 0.78:
            out.append({**good_request(rng), "kind": "cancelled"})
            out[-1]["body"]["stream"], out[-1]["body"]["max_tokens"] = True, 10
        else:
            name = rng.choice(sorted(POISONS))
            out.append({**POISONS[name](good_request(rng)), "kind": "poison", "poison": name})
    return out


def send(client, req: dict):
    """(status, text) of one request; a stream's text is its concatenated deltas; a cancelled stream
    is closed after its first event."""
    body = req.get("raw") or json.dumps(req["body"]).encode("utf-8")   # \ud800 written as a JSON escape
    headers = {"content-type": "application/json"}
    if not req.get("raw") and req["body"].get("stream"):
        with client.stream("POST", req["path"], content=body, headers=headers) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.text
            parts = []
            for line in r.iter_lines():
                if req["kind"] == "cancelled":
                    return 200, None
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, json.dumps(event)
                for c in event.get("choices", []):
                    parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            return 200, "".join(parts)
    r = client.post(req["path"], content=body, headers=headers)
    if r.status_code != 200:
        return r.status_code, r.text
    c = r.json()["choices"][0]
    return 200, c["text"] if "text" in c else c["message"]["content"]


def _key(req):
    b = dict(req["body"], stream=False)
    b.pop("temperature", None), b.pop("top_p", None), b.pop("seed", None)
    return json.dumps(b, sort_keys=True)


def run_load(url: str, n_requests: int, clients: int = 32, seed: int = 0) -> dict:
    """The fault load against ``url``: returns counts, failures by cause, latencies."""
    hx = httpx()
    mix = make_mix(n_requests, seed)
    solo = {}
    with hx.Client(base_url=url, timeout=120) as c:   # the expected answers: each good request alone
        for req in mix:
            if req["kind"] == "good" and _key(req) not in solo:
                status, text = send(c, {**req, "body": dict(req["body"], stream=False)})
                solo[_key(req)] = text if status == 200 else None
    for req in mix:   # the two valid-but-extreme poisons are greedy: their answer is the solo greedy one
        if req.get("poison") in ("temperature 1e-40", "top_p 1e-300") and _key(req) not in solo:
            with hx.Client(base_url=url, timeout=120) as c:
                status, text = send(c, {**req, "body": dict(req["body"], temperature=0, stream=False)})
            solo[_key(req)] = text if status == 200 else None
    lock = threading.Lock()
    stats = {"innocent_failures": {}, "poison_answers": {}, "latencies_s": [], "cancelled": 0, "good": 0}
    queue = list(enumerate(mix))

    def worker():
        with hx.Client(base_url=url, timeout=120) as c:   # one keep-alive connection per client
            while True:
                with lock:
                    if not queue:
                        return
                    _, req = queue.pop()
                t0 = time.perf_counter()
                try:
                    status, text = send(c, req)
                except Exception as exc:  # noqa: BLE001 - a transport error is a failure too
                    status, text = "transport:" + type(exc).__name__, None
                dt = time.perf_counter() - t0
                with lock:
                    if req["kind"] == "cancelled":
                        stats["cancelled"] += 1
                    elif req["kind"] == "good":
                        stats["good"] += 1
                        stats["latencies_s"].append(dt)
                        cause = None if status == 200 and text == solo[_key(req)] else \
                            (f"status {status}" if status != 200 else "text differs from solo")
                        if cause:
                            stats["innocent_failures"][cause] = stats["innocent_failures"].get(cause, 0) + 1
                    else:
                        k = f"{req['poison']}: {status}"
                        if req["poison"] in ("temperature 1e-40", "top_p 1e-300") and status == 200:
                            k += " (greedy answer)" if text == solo.get(_key(req)) else " (other answer)"
                        stats["poison_answers"][k] = stats["poison_answers"].get(k, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(stats.pop("latencies_s"))
    return {**stats, "requests": n_requests, "clients": clients, "wall_s": round(wall, 2),
            "requests_per_s": round(n_requests / wall, 1), "innocent_failure_count": sum(stats["innocent_failures"].values()),
            "good_latency_p50_s": round(statistics.median(lat), 4) if lat else None,
            "good_latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4) if lat else None}


def fairness(url: str, repeats: int = 3, big: int = 256) -> dict:
    """Latency of a one-prompt request sent 250 ms after a ``big``-prompt one, and alone."""
    hx = httpx()
    small = {"model": "a1", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0}
    large = {"model": "a2", "prompt": [" ".join(WORDS[i % len(WORDS)] for i in range(j, j + 6)) for j in range(big)],
             "max_tokens": 16, "temperature": 0}
    alone, behind, big_s = [], [], []
    with hx.Client(base_url=url, timeout=300) as c, hx.Client(base_url=url, timeout=300) as c_big:
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert c.post("/v1/completions", json=small).status_code == 200
            alone.append(time.perf_counter() - t0)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(c_big.post, "/v1/completions", json=large)
                time.sleep(0.25)
                t0 = time.perf_counter()
                assert c.post("/v1/completions", json=small).status_code == 200
                behind.append(time.perf_counter() - t0)
                assert fut.result().status_code == 200
                big_s.append(time.perf_counter() - t0 + 0.25)
    return {"big_prompts": big, "small_alone_s": round(statistics.median(alone), 3),
            "small_behind_big_s": round(statistics.median(behind), 3),
            "big_request_s": round(statistics.median(big_s), 3), "repeats": repeats}


def checkout(ref: str, into: str) -> str:
    """The package as of git ``ref``, extracted under ``into`` (for --code-ref)."""
    subprocess.run(f"git -C {ROOT} archive {ref} reft_kernels setup.py README.md | tar -x -C {into}",
                   shell=True, check=True)
    return into


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1600)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--code-ref", action="append", default=[],
                   help="also run the load on the package as of this git ref (repeatable)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    results = {"setup": {"requests": a.requests, "clients": a.clients, "python": sys.version.split()[0],
                         "cpus": os.cpu_count(), "note": "shared 2-core CPU, other jobs running"}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(tmp)
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        for ref in [f"this checkout ({head})", *a.code_ref]:
            path = ROOT if ref.startswith("this checkout") else checkout(ref, tempfile.mkdtemp(dir=tmp))
            proc, url = start_server(assets, pythonpath=path)
            try:
                before = rss_mib(proc.pid)
                run = run_load(url, a.requests, a.clients)
                run.update(rss_before_mib=round(before, 1), rss_after_mib=round(rss_mib(proc.pid), 1))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            extra = ["--max-prompts-per-request", "256"] if path == ROOT else []
            proc, url = start_server(assets, extra, pythonpath=path)
            try:
                run["fairness"] = fairness(url)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            results["runs"][ref if path == ROOT else f"{ref} (older code)"] = run
            print(json.dumps({ref: run}, indent=1), flush=True)
    if not a.no_write:
        out = os.path.join(HERE, "results", "server_faults.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        plot(results, out.replace(".json", ".png"))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    names = list(runs)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].bar(names, [r["innocent_failure_count"] for r in runs.values()], color="tab:red")
    ax[0].set_title(f"innocent failures (of {[r['good'] for r in runs.values()]} good)")
    w = 0.38
    xs = range(len(names))
    ax[1].bar([x - w / 2 for x in xs], [r["good_latency_p50_s"] for r in runs.values()], w, label="p50")
    ax[1].bar([x + w / 2 for x in xs], [r["good_latency_p99_s"] for r in runs.values()], w, label="p99")
    ax[1].set_xticks(list(xs), names)
    ax[1].set_title("good-request latency (s)")
    ax[1].legend()
    f = [r["fairness"] for r in runs.values()]
    ax[2].bar([x - w / 2 for x in xs], [v["small_alone_s"] for v in f], w, label="alone")
    ax[2].bar([x + w / 2 for x in xs], [v["small_behind_big_s"] for v in f], w, label="behind a 256-prompt request")
    ax[2].set_xticks(list(xs), names)
    ax[2].set_title("1-prompt request latency (s)")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{results['setup']['requests']} mixed requests, {results['setup']['clients']} clients "
                 "(shared 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
