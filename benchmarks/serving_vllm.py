"""``bench_serving.py --engine vllm``: vLLM + the reft_kernels plugin against our hf engine, pyreft
and stock vLLM, on the real model (SmolLM2-135M-Instruct, fp32, ``reft-kernels fetch-model``).

    <vllm venv>/bin/python benchmarks/bench_serving.py --engine vllm [--requests 16 64]
        [--adapters 1 4 16] [--new-tokens 16] [--repeats 2] [--out benchmarks/results/serving_vllm]

Work: N chat-free prompts of 6..34 tokens (10 different lengths), request i for adapter ``i % A``
(random LoReFT, rank 4, layer 15, position rule l1), greedy, exactly ``--new-tokens`` new tokens
each (eos ignored), all N submitted at once. Engines, each in its own process, alive together:

* ``plugin``: ``reft-kernels serve --engine vllm``'s engine (:class:`VllmEngine`: vLLM's
  ``LLMEngine``, eager, prefix caching off so repeats do not hit the cache), adapters selected per
  request through the plugin;
* ``stock``: the same engine loop on stock vLLM (plugin disabled, ``VLLM_PLUGINS=""``, no
  logits processor), every request on the base model: the ceiling the plugin is measured against
  (``stock_graphs``, not run by default: the same compiled, as vLLM runs without ``enforce_eager``);
* ``hf``: our hf engine (:class:`Engine`, mixed batching: one ``generate`` with per-row adapters);
* ``pyreft``: pyreft 0.1.0 itself in its own venv (transformers 4.45.1; ``REFT_PARITY_VENV``).
  pyreft has no server and one adapter per model: one pyreft ``ReftModel`` per adapter (built
  beforehand, all on the one base model) and one batched ``generate`` per adapter group (left
  padded, the edit at the last prompt token), one group after another. Its time to first token
  is when its group's first new token exists (a streamer), counted from the start of the run.

Time to first token: from submitting the N requests to a request's first streamed text
(``on_delta``), median and p90 over the requests. tokens/s: N x new tokens / wall seconds of the
whole set. The parent runs the engines in rounds (each (N, A) cell once per engine per round,
``--repeats`` rounds; pyreft only in the first ``--pyreft-rounds``, its runs take minutes) so the
shared machine's load swings hit them alike, and reports medians, the ratios per cell, and
``os.getloadavg()`` at every round.
"""
from __future__ import annotations

import json
import os
import tempfile
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYREFT_PYTHON = os.path.join(os.environ.get("REFT_PARITY_VENV", os.path.join(tempfile.gettempdir(), "reft-parity-venv")), "bin", "python")
ENGINES = ("plugin", "stock", "hf", "pyreft")
WORDS = ("Explain briefly why the sky is blue and how light scatters in the air around us today please answer "
         "in a few words with an example from daily life and a short summary").split()


def prompt_texts(n):
    return [" ".join(WORDS[: 6 + (3 * i) % len(WORDS)]) for i in range(n)]


def make_adapters(model_dir, root, n):
    """``n`` random LoReFT adapters (rank 4, layer 15, l1) in our format; {name: path}."""
    import torch
    from transformers import AutoModelForCausalLM
    from reft_kernels import ReftConfig, get_reft_model
    out = {}
    for i in range(n):
        path = os.path.join(root, f"a{i}")
        out[f"a{i}"] = path
        if os.path.isdir(path):
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(i)
        reft = get_reft_model(model, ReftConfig(representations=[{
            "layer": 15, "component": "block_output", "low_rank_dimension": 4,
            "intervention_type": "LoreftIntervention", "intervention_kwargs": {"dtype": torch.float32}}]))
        reft.save(path, include_model=False)
        with open(os.path.join(path, "reft_run.json"), "w") as f:
            json.dump({"positions": "l1", "share_weights": False, "template": "none"}, f)
    return out


# ------------------------------------------------------------------------------------------------
# children: one engine each, answering "N A" lines with one timed run
# ------------------------------------------------------------------------------------------------
def _ours(engine_name, a, adapters):
    """plugin / stock / hf: our serving engines; returns run(N, A) -> result dict."""
    import torch
    from transformers import AutoTokenizer
    from reft_kernels.serving import GenerationRequest, SamplingParams
    tok = AutoTokenizer.from_pretrained(a.model)
    if engine_name == "hf":
        from reft_kernels.base_models.pretrained import load_causal_lm
        from reft_kernels.serving import Engine
        torch.set_num_threads(a.threads)
        model, _, _ = load_causal_lm(a.model, torch.float32)
        model.generation_config.eos_token_id = None          # every request runs new_tokens tokens
        engine = Engine(model, tok, max_batch_size=max(a.requests), batch_window_s=0.02)
        engine.eos_ids = []
    else:
        from reft_kernels.serving.vllm_engine import VllmEngine

        class Engine_(VllmEngine):
            def _vllm_request(self, request):             # eos ignored: exactly max_tokens tokens each
                from vllm import SamplingParams as P
                prompt, p = super()._vllm_request(request)
                return prompt, P(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True, extra_args=p.extra_args)

        extra = {"enable_prefix_caching": False, "kv_cache_memory_bytes": 1 << 29, "seed": 0}
        if engine_name.startswith("stock"):
            extra.update(logits_processors=None, worker_extension_cls="")
        if engine_name == "stock_graphs":                 # compiled (CUDA graphs on a GPU): stock only
            extra["enforce_eager"] = False
        engine = Engine_(a.model, max_batch_size=max(a.requests), max_model_len=512, vllm_args=extra)
    if not engine_name.startswith("stock"):
        for name, path in adapters.items():
            engine.load_adapter(name, path)
    engine.warmup()
    engine.start()
    texts = prompt_texts(max(a.requests))
    ids = [tok(t)["input_ids"] for t in texts]

    def run(n, A):
        first = [None] * n
        t0 = time.perf_counter()

        def delta(i):
            def cb(text, finished, reason):
                if first[i] is None and text:
                    first[i] = time.perf_counter() - t0
            return cb
        futures = [engine.submit(GenerationRequest(ids[i], None if engine_name.startswith("stock") else f"a{i % A}",
                                                   SamplingParams(max_tokens=a.new_tokens), on_delta=delta(i)))
                   for i in range(n)]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        assert tokens == n * a.new_tokens, (tokens, n * a.new_tokens)
        return {"wall": wall, "tokens": tokens, "ttft": first}
    return run


def _pyreft(a):
    """pyreft 0.1.0 (its own venv): one ReftModel per adapter, one generate per adapter group."""
    import pyreft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    reft = []
    for i in range(max(a.adapters)):
        torch.manual_seed(i)
        reps = [{"layer": 15, "component": "block_output", "low_rank_dimension": 4,
                 "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                                           dtype=torch.float32)}]
        rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
        rm.set_device("cpu")
        reft.append(rm)
    texts = prompt_texts(max(a.requests))

    class FirstToken(BaseStreamer):
        def __init__(self, t0):
            self.t0, self.calls, self.at = t0, 0, None

        def put(self, value):   # first call: the prompt; second: the first new tokens of the batch
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter() - self.t0

        def end(self):
            pass

    def run(n, A):
        groups = {}
        for i in range(n):
            groups.setdefault(i % A, []).append(i)
        first, tokens = [None] * n, 0
        t0 = time.perf_counter()
        for adapter, rows in groups.items():                 # one adapter group after another
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True)
            last = enc["input_ids"].shape[1] - 1             # left padded: every row's last prompt token
            streamer = FirstToken(t0)
            with torch.no_grad():
                _, out = reft[adapter].generate(
                    dict(enc), unit_locations={"sources->base": (None, [[[last] for _ in rows]])},
                    intervene_on_prompt=True, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                    do_sample=False, pad_token_id=pad, streamer=streamer)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
            for i in rows:
                first[i] = streamer.at
        return {"wall": time.perf_counter() - t0, "tokens": tokens, "ttft": first}
    return run


def child(a):
    adapters = json.loads(a.adapter_json)
    run = _pyreft(a) if a.child == "pyreft" else _ours(a.child, a, adapters)
    print("READY", flush=True)
    for line in sys.stdin:
        n, A = map(int, line.split())
        print("RESULT " + json.dumps(run(n, A)), flush=True)


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------
def _expect(proc, tag, name):
    for line in proc.stdout:
        if line.startswith(tag):
            return json.loads(line[len(tag):].strip() or "null")
    sys.exit(f"{name} exited (rc {proc.wait()}) before answering {tag.strip()}")


def _spawn(name, a, model, adapters):
    args = ["--child", name, "--model", model, "--adapter-json", json.dumps(adapters), "--threads", str(a.threads),
            "--new-tokens", str(a.new_tokens), "--requests", *map(str, a.requests), "--adapters", *map(str, a.adapters)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", REFT_KERNELS_BACKEND=a.backend)
    python = sys.executable
    if name.startswith("stock"):
        env["VLLM_PLUGINS"] = ""
    if name == "pyreft":
        python, env["PYTHONPATH"] = PYREFT_PYTHON, ""
    else:
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([python, os.path.abspath(__file__), *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _expect(proc, "READY", name)   # one engine starting at a time
    return proc


def _summary(runs, n):
    walls = [r["wall"] for r in runs]
    ttft = sorted(t for r in runs for t in r["ttft"] if t is not None)
    return {"tokens": runs[0]["tokens"], "wall_s": [round(w, 3) for w in walls],
            "tokens_per_s": runs[0]["tokens"] / statistics.median(walls),
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))]}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"plugin": ("C0", "o"), "stock": ("C7", "s"), "hf": ("C1", "^"), "pyreft": ("C3", "v")}
    for n in sorted({r["requests"] for r in result["rows"]}):
        for eng, (color, marker) in styles.items():
            pts = [(r["adapters"], r[eng]) for r in result["rows"] if r["requests"] == n and eng in r]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ls = "-" if n == min(result["settings"]["requests"]) else "--"
            axes[0].plot(xs, [p[1]["tokens_per_s"] for p in pts], color=color, marker=marker, ls=ls,
                         label=f"{eng}, N={n}")
            axes[1].plot(xs, [p[1]["ttft_median_s"] for p in pts], color=color, marker=marker, ls=ls,
                         label=f"{eng}, N={n}")
    for ax, label in zip(axes, ("generated tokens / s", "time to first token, median (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("adapters A (requests spread round-robin)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"SmolLM2-135M fp32, {s['new_tokens']} new tokens, shared 2-core CPU (load {result['load_range']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="bench_serving.py --engine vllm", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pyreft-rounds", type=int, default=1, help="rounds pyreft runs in (its runs are long)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of hf and pyreft (vLLM's CPU backend binds one thread per core itself)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--backend", default="torch")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving_vllm"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--adapter-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    sys.path.insert(0, ROOT)
    from reft_kernels.base_models.real import cached_model_dir
    model = cached_model_dir()
    if model is None:
        sys.exit("run `reft-kernels fetch-model` first")
    adapters = make_adapters(model, os.path.join(os.path.dirname(model), "bench_serving_vllm_adapters"),
                             max(a.adapters))
    engines = [e for e in a.engines.split(",") if e != "pyreft" or os.path.exists(PYREFT_PYTHON)]
    procs = {e: _spawn(e, a, model, adapters) for e in engines}
    cells = [(n, A) for n in a.requests for A in a.adapters if A <= n]
    for e, proc in procs.items():                   # warm-up: the smallest cell once, untimed
        proc.stdin.write(f"{cells[0][0]} {cells[0][1]}\n")
        proc.stdin.flush()
        _expect(proc, "RESULT ", e)
    runs = {(e, n, A): [] for e in engines for n, A in cells}
    loads = []
    for r in range(a.repeats):
        for n, A in cells:
            for e, proc in procs.items():           # stock does not depend on A: it runs every cell anyway
                if e == "pyreft" and r >= a.pyreft_rounds:
                    continue
                proc.stdin.write(f"{n} {A}\n")
                proc.stdin.flush()
                runs[(e, n, A)].append(_expect(proc, "RESULT ", e))
        loads.append(os.getloadavg())
        print(f"round {len(loads)} done, load {loads[-1]}", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=120)
    rows = []
    for n, A in cells:
        row = {"requests": n, "adapters": A}
        for e in engines:
            row[e] = _summary(runs[(e, n, A)], n)
        row["ratios"] = {f"plugin_over_{e}": row["plugin"]["tokens_per_s"] / row[e]["tokens_per_s"]
                         for e in engines if e != "plugin" and "plugin" in row}
        rows.append(row)
        print(json.dumps({"N": n, "A": A, **{e: round(row[e]["tokens_per_s"], 1) for e in engines},
                          **{k: round(v, 2) for k, v in row["ratios"].items()}}), flush=True)
    one_min = [l[0] for l in loads]
    result = {"settings": {k: v for k, v in vars(a).items() if k not in ("child", "model", "adapter_json", "out")},
              "model": "SmolLM2-135M-Instruct fp32", "adapter": "LoReFT rank 4, layer 15, l1 (random)",
              "method": __doc__.split("\n\n", 2)[2].strip(),
              "loadavg_per_round": loads, "load_range": f"{min(one_min):.1f}-{max(one_min):.1f}",
              "machine": {"cpu_count": os.cpu_count(), "note": "shared 2-core machine with other jobs: read ratios"},
              "rows": rows}
    write_results(result, a.out, plot)



def write_results(result: dict, out: str, plot) -> None:
    """``out``.json (the result) and ``out``.png (``plot(result, path)``); both serving benchmarks use it."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, out + ".png")
    print(f"wrote {out}.json and {out}.png")

if __name__ == "__main__":
    main(sys.argv[1:])
