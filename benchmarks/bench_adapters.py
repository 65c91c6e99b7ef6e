"""Many adapters on one base model (CPU): mixed-adapter batches and 1,000 resident adapters.

1. ``mixed``: a small random Llama (hidden 576, SmolLM-135M's width) with 16 LoReFT adapters
   (rank 4, the middle layer, positions f7+l7 per row). A batch whose rows use 16 different
   adapters (``adapter_ids``, one stacked per-row op call per site) against the same batch with
   one adapter for every row (the single-adapter path), for a no-grad forward, a training step
   (forward + backward) and greedy ``generate`` with a KV cache. Calls alternate; the ratio is the
   median of the paired ratios (robust to a machine whose load drifts). Target: <= 1.15x.
2. ``resident``: 1,000 LoReFT adapters (d=576, r=4, one layer) added to one ReftModel: RSS growth
   against their parameter bytes (as allocated, and after glibc's ``malloc_trim`` returns the
   free heap: building a LoReFT module draws a transient d x (d - r) tensor for pyreft's RNG
   parity, and glibc keeps that freed heap mapped), that the base model's tensors are not copied (same data
   pointers), and the cost of switching: ``set_adapter`` alone and a forward right after a switch
   against a forward with an unchanged adapter.

One torch thread by default, so process CPU time is the work done on a shared machine.

    python benchmarks/bench_adapters.py                 # writes benchmarks/results/bench_adapters.json
    python benchmarks/bench_adapters.py --repeats 3 --adapters-resident 100    # a smoke run
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_adapters.py --parts resident \
        --out benchmarks/results/bench_adapters_resident_mmap128k.json   # glibc: big temporaries mmapped
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reft_kernels  # noqa: E402
from bench_model import compare, timed  # noqa: E402  (alternating timings, medians and ratios)


def build_model(hidden, layers, vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 3), vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def loreft_config(hidden, rank, layer, dtype=torch.float32):
    # compact: the kilobyte adapters measured in docs/api.md (the default completion, "pyreft",
    # adds a d x d fp32 base per adapter: 1.3 MiB at d = 576)
    iv = reft_kernels.LoreftIntervention(embed_dim=hidden, low_rank_dimension=rank, dtype=dtype, completion="compact")
    return reft_kernels.ReftConfig(representations=[{"layer": layer, "component": "block_output",
                                                     "low_rank_dimension": rank, "intervention": iv}])


def mixed_benchmark(a) -> dict:
    model = build_model(a.hidden, a.layers, a.vocab)
    layer = a.layers // 2
    reft = reft_kernels.get_reft_model(model, loreft_config(a.hidden, a.rank, layer), backend=a.backend)
    names = ["default"] + [f"a{i}" for i in range(1, a.adapters)]
    for name in names[1:]:
        reft.add_adapter(name, loreft_config(a.hidden, a.rank, layer))
    for name in names:   # non-trivial weights, so every adapter really edits
        for iv in reft.adapter_interventions(name).values():
            with torch.no_grad():
                iv.learned_source.bias.uniform_(-1, 1)
    reft.eval()
    g = torch.Generator().manual_seed(1)
    mixed_ids = [names[b % len(names)] for b in range(a.batch)]
    results = {}

    ids = torch.randint(1, a.vocab, (a.batch, a.seq), generator=g)
    locs = torch.tensor([[list(range(7)) + list(range(a.seq - 7, a.seq))]] * a.batch)
    with torch.no_grad():
        results["forward"] = compare({
            "one_adapter": lambda: reft(input_ids=ids, intervention_locations=locs),
            "mixed": lambda: reft(input_ids=ids, intervention_locations=locs, adapter_ids=mixed_ids)},
            a.repeats, baseline="one_adapter")

    reft.train()

    def step(**kw):
        reft(input_ids=ids, intervention_locations=locs, labels=ids, **kw).loss.backward()
    results["train_step"] = compare({"one_adapter": step, "mixed": lambda: step(adapter_ids=mixed_ids)},
                                    a.repeats, baseline="one_adapter")
    reft.zero_grad(set_to_none=True)
    reft.eval()

    prompt = torch.randint(1, a.vocab, (a.batch, a.prompt), generator=g)
    plocs = torch.tensor([[list(range(7)) + list(range(a.prompt - 7, a.prompt))]] * a.batch)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    results["generate"] = compare({
        "one_adapter": lambda: reft.generate(input_ids=prompt, intervention_locations=plocs, **kw),
        "mixed": lambda: reft.generate(input_ids=prompt, intervention_locations=plocs, adapter_ids=mixed_ids, **kw)},
        max(3, a.repeats // 2), baseline="one_adapter")
    results["generate_every_token"] = compare({
        "one_adapter": lambda: reft.generate(input_ids=prompt, intervene_on_prompt=False, **kw),
        "mixed": lambda: reft.generate(input_ids=prompt, intervene_on_prompt=False, adapter_ids=mixed_ids, **kw)},
        max(3, a.repeats // 2), baseline="one_adapter")
    return results


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc); False where unavailable."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def resident_benchmark(a) -> dict:
    d, r = 576, 4
    model = build_model(d, 1, 512)
    reft = reft_kernels.get_reft_model(model, loreft_config(d, r, 0, dtype=torch.bfloat16), backend=a.backend)
    reft.eval()
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    gc.collect()
    malloc_trim()
    before = rss_bytes()
    saved = None
    if a.resident_source == "load":   # what a server does: load saved adapters (the checkpoint path)
        saved = tempfile.mkdtemp()
        reft.save(saved)
        gc.collect()
        malloc_trim()
        before = rss_bytes()
    t0 = time.perf_counter()
    for i in range(a.adapters_resident):
        if saved:
            reft.load_adapter(saved, adapter_name=f"u{i}")
        else:
            reft.add_adapter(f"u{i}", loreft_config(d, r, 0, dtype=torch.bfloat16))
    add_s = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    trimmed = malloc_trim()
    after_trim = rss_bytes()
    param_bytes = sum(p.numel() * p.element_size() for n in reft.adapter_names[1:]
                      for p in reft.adapter_interventions(n).parameters())
    ids = torch.randint(1, 512, (1, 32), generator=torch.Generator().manual_seed(3))
    locs = torch.tensor([[[0, 31]]])
    names = reft.adapter_names[1:]
    switch, same, after_switch = [], [], []
    with torch.no_grad():
        reft.set_adapter(names[0])
        reft(input_ids=ids, intervention_locations=locs)
        for k in range(a.repeats * 10):
            name = names[(k * 37) % len(names)]
            t = time.perf_counter()
            reft.set_adapter(name)
            switch.append(time.perf_counter() - t)
            after_switch.append(timed(lambda: reft(input_ids=ids, intervention_locations=locs))[0])
            same.append(timed(lambda: reft(input_ids=ids, intervention_locations=locs))[0])
    unchanged = all(p.data_ptr() == base_ptrs[n] for n, p in model.named_parameters())
    return {"adapters": a.adapters_resident, "d": d, "rank": r, "adapter_dtype": "bfloat16 W/b, fp32 R basis",
            "param_bytes": param_bytes, "rss_delta_bytes": after - before,
            "rss_over_param_bytes": (after - before) / param_bytes,
            "rss_delta_after_malloc_trim_bytes": after_trim - before if trimmed else None,
            "rss_after_malloc_trim_over_param_bytes": (after_trim - before) / param_bytes if trimmed else None,
            "source": a.resident_source, "add_all_s": add_s,
            "base_model_tensors_shared": unchanged,
            "set_adapter_median_us": 1e6 * statistics.median(switch),
            "forward_after_switch_median_ms": 1e3 * statistics.median(after_switch),
            "forward_same_adapter_median_ms": 1e3 * statistics.median(same)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--adapters-resident", type=int, default=1000)
    p.add_argument("--resident-source", choices=["add", "load"], default="add",
                   help="build the resident adapters with add_adapter (fresh) or load_adapter (from a checkpoint)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="torch")
    p.add_argument("--parts", default="resident,mixed", help="comma list of: resident, mixed")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_adapters.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    parts = a.parts.split(",")
    resident = resident_benchmark(a) if "resident" in parts else None   # first: RSS growth is the adapters'
    mixed = mixed_benchmark(a) if "mixed" in parts else {}
    print(f"Llama hidden={a.hidden} layers={a.layers}; {a.adapters} LoReFT r={a.rank} adapters at one layer; "
          f"batch={a.batch} seq={a.seq} prompt={a.prompt} new={a.new_tokens}; threads={a.threads}")
    print(f"{'benchmark':<22}{'one adapter ms':>16}{'mixed ms':>10}{'cpu ratio':>11}{'wall ratio':>12}")
    for bench, rows in mixed.items():
        one, mix = rows["one_adapter"], rows["mixed"]
        print(f"{bench:<22}{1e3 * one['cpu']['median_s']:>16.1f}{1e3 * mix['cpu']['median_s']:>10.1f}"
              f"{mix['cpu']['ratio']:>11.3f}{mix['wall']['ratio']:>12.3f}")
    print("resident:", json.dumps(resident, indent=1))
    meta = {"args": vars(a), "torch": torch.__version__, "transformers": transformers.__version__,
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "backend_op": reft_kernels.model.plan.reft_edit_multi.__module__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "mixed": mixed, "resident": resident}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
