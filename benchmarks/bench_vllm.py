"""vLLM + the reft_kernels plugin vs stock vLLM vs our hf engine, side by side on the real model.

    /tmp/reft-vllm-venv/bin/python benchmarks/bench_vllm.py [--requests 16] [--new-tokens 16]
        [--adapters 16] [--repeats 7] [--out benchmarks/results/vllm.json]

Run in the vLLM venv (``bash .ci/vllm_venv.sh``). SmolLM2-135M-Instruct in fp32
(``reft-kernels fetch-model``), random LoReFT adapters (rank 4, layer 15, l1 positions).
Configurations, each in its own process (one engine at a time), greedy, every request exactly
``--new-tokens`` tokens (``min_tokens``):

* ``stock``: vLLM with the plugin disabled (``VLLM_PLUGINS=""``): no adapters;
* ``stock_graphs``: the same without ``enforce_eager`` (torch.compile, CUDA graphs on a GPU; the
  plugin's adapters need eager mode, so this is what stock vLLM gains over every other row);
* ``plugin_base``: vLLM with the plugin, no request selects an adapter (the plugin's overhead);
* ``plugin_adapters``: vLLM with the plugin, requests spread over ``--adapters`` adapters;
* ``hf``: our hf engine (``serving.Engine``, one mixed ``generate``), same requests and adapters.

All configurations run at once, each in its own process, and the parent times them in rounds
(one whole batch each per round, ``--repeats`` rounds), so the load of the shared machine hits
them alike. tokens/s is requests x new tokens / the median (and the best) wall time of a batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def prompts(tokenizer, n):
    words = ("Explain briefly why the sky is blue and how light scatters in the air around us today "
             "please answer in a few words with an example from daily life and a short summary").split()
    return [tokenizer(" ".join(words[: 6 + (3 * i) % len(words)]))["input_ids"] for i in range(n)]


def make_adapters(model_dir, root, n):
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
            json.dump({"positions": "l1", "share_weights": False}, f)
    return out


def run_vllm(a, config):
    from vllm import LLM, SamplingParams
    from transformers import AutoTokenizer
    from reft_kernels.vllm_plugin import REFT_LOGITS_PROCESSOR, reft_prompt
    tok = AutoTokenizer.from_pretrained(a.model)
    ps = prompts(tok, a.requests)
    adapters = json.loads(a.adapter_json)
    kw = dict(dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 29, max_num_seqs=max(16, a.requests),
              enforce_eager=True, seed=0, enable_prefix_caching=False)   # repeats must not hit the cache
    if config == "stock_graphs":
        kw["enforce_eager"] = False
    if not config.startswith("stock"):
        kw.update(hf_overrides={"reft_adapters": {n: {"path": p, "positions": "l1"} for n, p in adapters.items()}},
                  logits_processors=[REFT_LOGITS_PROCESSOR])
    t0 = time.perf_counter()
    llm = LLM(a.model, **kw)
    startup = time.perf_counter() - t0
    names = sorted(adapters)
    reqs, params = [], []
    for i, p in enumerate(ps):
        name = names[i % len(names)] if config == "plugin_adapters" else None
        reqs.append(reft_prompt(p, name, "l1"))
        params.append(SamplingParams(max_tokens=a.new_tokens, min_tokens=a.new_tokens, temperature=0.0,
                                     extra_args={"reft_adapter": name} if name else None))
    def once():
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == a.new_tokens for o in outs)
        return time.perf_counter() - t
    once()                                          # warm-up
    return startup, once


def run_hf(a):
    import torch
    from reft_kernels.models.pretrained import load_causal_lm
    from reft_kernels.serving import Engine, GenerationRequest, SamplingParams
    model, tok, _ = load_causal_lm(a.model, torch.float32)
    model.generation_config.eos_token_id = None        # every request runs new_tokens tokens
    engine = Engine(model, tok, max_batch_size=max(16, a.requests))
    engine.eos_ids = []
    adapters = json.loads(a.adapter_json)
    for n, p in adapters.items():
        engine.load_adapter(n, p)
    names = sorted(adapters)
    reqs = lambda: [GenerationRequest(p, names[i % len(names)], SamplingParams(max_tokens=a.new_tokens))  # noqa: E731
                    for i, p in enumerate(prompts(tok, a.requests))]
    def once():
        t = time.perf_counter()
        out = engine.generate_batch(reqs())
        assert all(len(o.token_ids) == a.new_tokens for o in out), [len(o.token_ids) for o in out]
        return time.perf_counter() - t
    once()                                          # warm-up
    return None, once


def child(a):
    torch_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    import torch
    torch.set_num_threads(torch_threads)
    startup, once = run_hf(a) if a.config == "hf" else run_vllm(a, a.config)
    print("READY " + json.dumps(startup), flush=True)
    for line in sys.stdin:                          # one timed run per line from the parent
        if line.strip() != "run":
            break
        print("TIME " + json.dumps(once()), flush=True)


def _expect(proc, tag: str, config: str):
    for line in proc.stdout:
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    sys.exit(f"{config} exited (rc {proc.wait()}) before answering {tag.strip()}")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["configs"])
    vals = [result["configs"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, vals, color=["#888", "#4a7", "#27a", "#c63", "#555"][: len(names)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(f"{result['requests']} requests x {result['new_tokens']} tokens, {result['adapters']} adapters, "
                 "SmolLM2-135M fp32, CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--configs", default="stock,plugin_base,plugin_adapters,hf")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vllm.json"))
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--adapter-json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.config:
        return child(a)
    from reft_kernels.models.real import cached_model_dir
    model = cached_model_dir()
    if model is None:
        sys.exit("run `reft-kernels fetch-model` first")
    adapters = make_adapters(model, os.path.expanduser("~/.cache/reft_kernels/bench_vllm_adapters"), a.adapters)
    result = {"model": "smollm2-135m-instruct fp32", "requests": a.requests, "new_tokens": a.new_tokens,
              "adapters": a.adapters, "repeats": a.repeats, "machine": "shared 2-core CPU (other jobs running)",
              "configs": {}}
    # Every configuration lives in its own process, all at once; the parent runs them in rounds
    # (one timed batch each per round), so the shared machine's load swings hit all of them alike.
    procs = {}
    for config in a.configs.split(","):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
        if config.startswith("stock"):
            env["VLLM_PLUGINS"] = ""
        cmd = [sys.executable, __file__, "--config", config, "--model", model, "--adapter-json", json.dumps(adapters),
               "--requests", str(a.requests), "--new-tokens", str(a.new_tokens)]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        procs[config] = proc
        startup = _expect(proc, "READY ", config)  # one engine starting at a time
        result["configs"][config] = {"startup_s": startup, "times_s": []}
    for _ in range(a.repeats):
        for config, proc in procs.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            result["configs"][config]["times_s"].append(_expect(proc, "TIME ", config))
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=120)
    for config, r in result["configs"].items():
        r["tokens_per_s"] = a.requests * a.new_tokens / statistics.median(r["times_s"])
        r["tokens_per_s_best"] = a.requests * a.new_tokens / min(r["times_s"])   # least disturbed run
        print(f"{config:16s} {r['tokens_per_s']:7.1f} tok/s median, {r['tokens_per_s_best']:7.1f} best "
              f"({[round(t, 2) for t in r['times_s']]})", flush=True)
    c = result["configs"]
    for a_, b_ in (("plugin_adapters", "hf"), ("plugin_base", "stock"), ("plugin_adapters", "stock"),
                   ("stock_graphs", "stock")):
        if a_ in c and b_ in c:
            for key in ("tokens_per_s", "tokens_per_s_best"):
                result[f"{a_}_over_{b_}{key[len('tokens_per_s'):]}"] = c[a_][key] / c[b_][key]
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, a.out.replace(".json", ".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "configs"}, indent=1))


if __name__ == "__main__":
    main()
