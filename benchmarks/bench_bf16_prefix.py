"""Where a training step's time goes with a bf16 base and the frozen-prefix cache (issue 18).

One process, one thread, everything alternating round by round so each pair sees the same machine
load; ratios are medians of per-round ratios:

* ``matmul``: 512x576 @ 576x1536 (a SmolLM2 MLP projection of a 512-token batch) in fp32 and bf16,
  and the kernel oneDNN runs for the bf16 one (``ONEDNN_VERBOSE=1`` in a child process);
* ``step``: on SmolLM2-135M-Instruct and the emoji quick start's batch (10 examples, LoReFT r=4 at
  layer 15, last prompt token): forward+backward of the frozen base (a zero trainable scalar added
  at layer 15's output: the floor of any engine), of ours without and with the prefix cache, in
  fp32 and bf16;
* ``profile``: the self CPU time per operator of one bf16 cached forward+backward (torch.profiler).

Writes ``benchmarks/results/bf16_prefix.json`` and ``.png``.

    python benchmarks/bench_bf16_prefix.py [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MATMUL = "import torch; torch.set_num_threads(1); a = torch.randn(512, 576).bfloat16(); (a @ torch.randn(576, 1536).bfloat16())"


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _paired(fns: dict, rounds: int) -> dict:
    """{name: [seconds per round]}; round 0 warms up and is dropped."""
    times = {k: [] for k in fns}
    for i in range(rounds + 1):
        for k, fn in fns.items():
            t = _timed(fn)
            if i:
                times[k].append(t)
    return times


def _ratio(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_matmul(rounds: int) -> dict:
    import torch
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    a16, b16 = a.bfloat16(), b.bfloat16()
    times = _paired({"fp32": lambda: [a @ b for _ in range(5)], "bf16": lambda: [a16 @ b16 for _ in range(5)]},
                    rounds * 3)
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True).stdout
    kernel = next((line.split(",")[6] for line in out.splitlines() if ",exec,cpu,matmul," in line), "not oneDNN")
    return {"fp32_ms": 1e3 * statistics.median(times["fp32"]) / 5, "bf16_ms": 1e3 * statistics.median(times["bf16"]) / 5,
            "bf16_over_fp32": _ratio(times, "bf16", "fp32"), "onednn_bf16_kernel": kernel}


def bench_step(model_dir: str, rounds: int) -> dict:
    import torch
    import transformers

    import reft_kernels as rk
    from bench_real_model import EXAMPLES
    from reft_kernels.model.prefix_cache import PrefixCache
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q, _ in EXAMPLES]
    fns, caches, profile_fn = {}, {}, None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(dtype).eval()
        layer = model.config.num_hidden_layers // 2
        torch.manual_seed(0)
        reft = rk.get_reft_model(model, rk.ReftConfig(representations=[{
            "layer": layer, "component": "block_output", "low_rank_dimension": 4,
            "intervention": rk.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                                  dtype=torch.float32)}]))
        tok.padding_side = "right"
        data = rk.make_last_position_supervised_data_module(tok, model, prompts, [a for _, a in EXAMPLES])
        batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(EXAMPLES))])
        batch = {k: v for k, v in batch.items() if k != "id"}
        cache = PrefixCache(reft, log=lambda m: None)
        cache.install()
        caches[name] = cache
        scale = torch.nn.Parameter(torch.zeros(()))

        def base(model=model, layer=layer, batch=batch, scale=scale, cache=cache):
            h = model.model.layers[layer].register_forward_hook(
                lambda m, i, o: ((o[0] + scale.to(o[0].dtype),) + tuple(o[1:])) if isinstance(o, tuple)
                else o + scale.to(o.dtype))
            cache.paused = True
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss.backward()
            finally:
                h.remove()
                cache.paused = False

        def ours(reft=reft, batch=batch, cache=cache, cached=False):
            cache.paused = not cached
            reft(**batch).loss.backward()
            cache.paused = False

        fns[f"base_{name}"] = base
        fns[f"ours_{name}"] = ours
        fns[f"ours_{name}_cache"] = lambda ours=ours: ours(cached=True)
        if name == "bf16":
            profile_fn = fns["ours_bf16_cache"]
    times = _paired(fns, rounds)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profile_fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratios": {"base_bf16_over_base_fp32": _ratio(times, "base_bf16", "base_fp32"),
                       "ours_bf16_over_ours_fp32": _ratio(times, "ours_bf16", "ours_fp32"),
                       "ours_bf16_cache_over_ours_bf16": _ratio(times, "ours_bf16_cache", "ours_bf16"),
                       "ours_fp32_over_base_fp32": _ratio(times, "ours_fp32", "base_fp32"),
                       "ours_bf16_over_base_bf16": _ratio(times, "ours_bf16", "base_bf16"),
                       "ours_bf16_cache_over_base_bf16": _ratio(times, "ours_bf16_cache", "base_bf16"),
                       "ours_fp32_cache_over_base_fp32": _ratio(times, "ours_fp32_cache", "base_fp32")},
            "cache_hits": {k: c.hits for k, c in caches.items()},
            "cache_mib": {k: c.bytes / 2**20 for k, c in caches.items()},
            "profile_ours_bf16_cache_top_ops": [
                {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                 "calls": e.count} for e in ops]}


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    med = result["step"]["median_s"]
    names = ["base_fp32", "ours_fp32", "ours_fp32_cache", "base_bf16", "ours_bf16", "ours_bf16_cache"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    a.bar(range(len(names)), [med[n] for n in names], color=["#999", "#48c", "#8c4"] * 2)
    a.set_xticks(range(len(names)))
    a.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
    a.set_ylabel("fwd+bwd seconds (median, 1 thread)")
    a.set_title("SmolLM2-135M, quick-start batch, LoReFT at layer 15")
    top = result["step"]["profile_ours_bf16_cache_top_ops"][:8]
    b.barh([t["op"][:28] for t in top][::-1], [t["self_ms"] for t in top][::-1])
    b.set_xlabel("self CPU ms in one bf16 cached fwd+bwd")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: reft-kernels fetch-model's)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bf16_prefix.json"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.model is None:
        from reft_kernels.base_models.real import fetch_model
        args.model = fetch_model()
    result = {"machine": f"shared 2-core CPU, load average {os.getloadavg()[0]:.1f} at start", "threads": 1,
              "torch": torch.__version__, "matmul": bench_matmul(args.rounds)}
    print(json.dumps(result["matmul"]), flush=True)
    result["step"] = bench_step(args.model, args.rounds)
    result["load_average_at_end"] = os.getloadavg()[0]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["step"]["ratios"], indent=1))
    _plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
