"""Model-level part of the GPU check: a Llama-shaped model's train step and generate, ReFT vs base.

Reuses bench_model.py (model, intervention plan, paired alternating timing) on the GPU: a random
~1B Llama (hidden 2048, 16 layers, 32 heads, intermediate 5632, vocab 32000) in bf16, LoReFT
rank 4, settings ``one`` (one intervention, middle layer, f7+l7) and ``all_f7l7`` (two per
layer). Per backend the overhead is the median of the paired ReFT/base time ratios, minus 1.

    train     forward + backward of the LM loss (the base model's backward reaches the same layer)
    generate  greedy generate with a KV cache, batch 1 (prefill edits the prompt positions)

Times are wall-clock with a CUDA synchronise at the end of each call ("cpu" is the host's
process time of the same call).

    python benchmarks/gpu/gpu_bench_model.py --json model.json            # on a GPU
    python benchmarks/gpu/gpu_bench_model.py --json model.json --tiny     # CPU smoke run
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # benchmarks/
from bench_model import build_model, compare, generate_fns, train_fns  # noqa: E402
from gpu_bench_ops import parse_bench_args, write_results  # noqa: E402
from gpu_launch import available  # noqa: E402

LLAMA_1B = dict(hidden=2048, layers=16, vocab=32000)
SIZES = {  # mode: model and workload
    "full": dict(**LLAMA_1B, batch=8, seq=512, prompt=128, new_tokens=32, repeats=8, gen_repeats=4),
    "quick": dict(**LLAMA_1B, batch=4, seq=256, prompt=64, new_tokens=16, repeats=3, gen_repeats=2),
    "tiny": dict(hidden=64, layers=2, vocab=128, batch=2, seq=32, prompt=16, new_tokens=3, repeats=1,
                 gen_repeats=1),
}


def synced(fns, device):
    """Each callable followed by a CUDA synchronise, so wall time covers its GPU work."""
    if device.type != "cuda":
        return fns

    def wrap(fn):
        def call():
            fn()
            torch.cuda.synchronize()
        return call
    return {name: wrap(fn) for name, fn in fns.items()}


def run(device, dtype, size, backends, deadline, settings=("one", "all_f7l7")):
    """{"<train|generate>/<setting>/<backend>": compare() result}, and errors."""
    a = SimpleNamespace(**SIZES[size], rank=4, device=device, dtype=dtype, backend="auto")
    results, errors = {}, []
    base_model = build_model(a)
    n_params = sum(p.numel() for p in base_model.parameters())
    print(f"Llama hidden={a.hidden} layers={a.layers} vocab={a.vocab}: {n_params / 1e9:.2f}B parameters, "
          f"{dtype}, train batch={a.batch} seq={a.seq}; generate prompt={a.prompt} new={a.new_tokens}", flush=True)
    for backend in backends:
        a.backend = backend
        for setting in settings:
            for kind, make, repeats in (("train", train_fns, a.repeats), ("generate", generate_fns, a.gen_repeats)):
                key = f"{kind}/{setting}/{backend}"
                if time.time() > deadline:
                    errors.append(f"{key}: skipped, time budget spent")
                    continue
                try:
                    fns = synced(make(a, base_model, setting), device)
                    with torch.set_grad_enabled(kind == "train"):
                        results[key] = compare(fns, repeats, warmup=1)
                    r = results[key]["reft_kernels"]["wall"]
                    print(f"{key:<28} base {1e3 * results[key]['base']['wall']['median_s']:9.2f} ms  "
                          f"reft {1e3 * r['median_s']:9.2f} ms  overhead {r['overhead_pct']:+6.1f}%", flush=True)
                except Exception as err:  # noqa: BLE001 - record it, go on
                    errors.append(f"{key}: {type(err).__name__}: {str(err)[:300]}")
                    print(f"  {errors[-1]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    meta = dict(n_params=n_params, dtype=str(dtype), **{k: v for k, v in vars(a).items()
                                                         if k not in ("device", "dtype", "backend")})
    return results, errors, meta


def main(argv=None):
    args, device, deadline = parse_bench_args(__doc__, argv, 150, "CPU smoke run: a tiny Llama")
    if args.tiny:
        size, dtype = "tiny", torch.float32
    else:
        size, dtype = ("quick" if args.quick else "full"), torch.bfloat16
    # every backend on the GPU; on CPU the interpreted triton would only measure the interpreter
    backends = sorted(available(device), key=["triton", "native", "torch"].index)  # ours first
    settings = ("one",) if args.quick else ("one", "all_f7l7")
    results, errors, meta = run(device, dtype, size, backends, deadline, settings)
    return write_results(args.json, device, errors, "results", meta=meta, results=results)


if __name__ == "__main__":
    sys.exit(main())
