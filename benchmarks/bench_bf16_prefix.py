"""Where a training step's time goes with a bf16 base and the frozen-prefix cache (issue 18).

One process, one thread, everything alternating round by round so each pair sees the same machine
load; ratios are medians of per-round ratios:

* ``matmul``: 512x576 @ 576x1536 (a SmolLM2 MLP projection of a 512-token batch) in fp32 and bf16,
  and the kernel oneDNN runs for the bf16 one (``ONEDNN_VERBOSE=1`` in a child process);
* ``step``: on SmolLM2-135M-Instruct and the emoji quick start's batch (10 examples, LoReFT r=4 at
  layer 15, last prompt token), in fp32 and bf16: forward+backward of the frozen base (a zero
  trainable scalar added at layer 15's output, one padded call, every position's logits: the floor
  of an engine that does the base's work), and of ours with the training levers added one at a
  time: the frozen-prefix cache, logits at labelled positions only, length groups without padding
  (the last rung is what ``ReftTrainer*`` run);
* ``profile``: the self CPU time per operator of one bf16 forward+backward with every lever on
  (torch.profiler).

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


RUNGS = (   # name: (prefix cache, logits at labelled positions, length groups); each adds one lever
    ("ours", False, False, False), ("ours+cache", True, False, False),
    ("ours+cache+labelled", True, True, False), ("ours+cache+labelled+groups", True, True, True))


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
    fns, caches, shape = {}, {}, None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(dtype).eval()
        layer = model.config.num_hidden_layers // 2
        torch.manual_seed(0)
        reft = rk.get_reft_model(model, rk.ReftConfig(representations=[{
            "layer": layer, "component": "block_output", "low_rank_dimension": 4,
            "intervention": rk.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                                  dtype=torch.float32)}]))
        reft.train()   # as in a training step (the base stays in eval: no dropout)
        tok.padding_side = "right"
        data = rk.make_last_position_supervised_data_module(tok, model, prompts, [a for _, a in EXAMPLES])
        batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(EXAMPLES))])
        batch = {k: v for k, v in batch.items() if k != "id"}
        shape = {"batch": list(batch["input_ids"].shape), "real_tokens": int(batch["attention_mask"].sum())}
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

        def ours(cached, labelled, groups, reft=reft, batch=batch, cache=cache):
            cache.paused, reft.labelled_logits, reft.trim_padding = not cached, labelled, groups
            try:
                reft(**batch).loss.backward()
            finally:
                cache.paused = False

        fns[f"base_{name}"] = base
        for rung, cached, labelled, groups in RUNGS:
            fns[f"{rung}_{name}"] = (lambda ours=ours, c=cached, l=labelled, g=groups: ours(c, l, g))
    profile_fn = fns[f"{RUNGS[-1][0]}_bf16"]
    times = _paired(fns, rounds)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profile_fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ratios = {"base_bf16_over_base_fp32": _ratio(times, "base_bf16", "base_fp32")}
    for d in ("fp32", "bf16"):
        for rung, *_ in RUNGS:
            ratios[f"{rung}_{d}_over_base_{d}"] = _ratio(times, f"{rung}_{d}", f"base_{d}")
    for rung, *_ in RUNGS:
        ratios[f"{rung}_bf16_over_{rung}_fp32"] = _ratio(times, f"{rung}_bf16", f"{rung}_fp32")
    return {"batch": shape, "median_s": {k: statistics.median(v) for k, v in times.items()}, "ratios": ratios,
            "cache_hits": {k: c.hits for k, c in caches.items()},
            "cache_mib": {k: c.bytes / 2**20 for k, c in caches.items()},
            "profile_ours_bf16_top_ops": [
                {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                 "calls": e.count} for e in ops]}


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    med = result["step"]["median_s"]
    names = ["base"] + [rung for rung, *_ in RUNGS]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    x = range(len(names))
    for k, (d, color) in enumerate((("fp32", "#48c"), ("bf16", "#c84"))):
        a.bar([i + 0.4 * k - 0.2 for i in x], [med[f"{n}_{d}"] for n in names], 0.4, label=d, color=color)
    a.set_xticks(list(x))
    a.set_xticklabels([n.replace("+", "\n+") for n in names], fontsize=7)
    a.set_ylabel("fwd+bwd seconds (median, 1 thread)")
    a.set_title("SmolLM2-135M, quick-start batch, LoReFT at layer 15")
    a.legend()
    top = result["step"]["profile_ours_bf16_top_ops"][:8]
    short = [t["op"].replace("aten::_scaled_dot_product_flash_attention_for_cpu", "sdpa flash cpu")[:32] for t in top]
    b.barh(short[::-1], [t["self_ms"] for t in top][::-1])
    b.set_xlabel("self CPU ms in one bf16 fwd+bwd, every lever on")
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
