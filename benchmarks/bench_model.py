"""Model-level benchmark: a ReFT training step and generation against the base model (CPU).

Settings (a random Llama built from a config; no hub):
  one       1 LoReFT at the middle layer, positions f7+l7 (14 per row)
  all_f7l7  every layer, f7+l7 untied: 2 LoReFTs per layer (first 7 / last 7 positions)

Training step = forward + backward of the LM loss. The base model gets the same backward work:
a hook makes its hidden state at the lowest intervened layer require grad, so the gradient flows
from the loss down to the same layer in both. Generation = greedy ``generate`` with a KV cache,
batch 1, run 3x as often (a call is short). Base and ReFT runs alternate; the reported overhead
is the median of the paired ratios, which tolerates a machine whose load drifts. Default: one
torch thread, so process CPU time is the work done (robust on a shared machine); wall time is
reported too. pyreft is measured in the same process when it is importable (its own
environment: pyreft 0.1.0 needs transformers 4.45).

    python benchmarks/bench_model.py                      # hidden 512, 4 layers, seq 256, batch 4
    python benchmarks/bench_model.py --repeats 3 --hidden 128 --seq 64   # a smoke run

The pieces take an argparse-like namespace; ``device`` and ``dtype`` attributes (default CPU,
float32) place the model, inputs and interventions (benchmarks/gpu/gpu_bench_model.py uses them).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import reft_kernels  # noqa: E402

try:
    import pyreft
except ImportError:
    pyreft = None


def build_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                      num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                      vocab_size=a.vocab, max_position_embeddings=4096, pad_token_id=0)
    with torch.device(getattr(a, "device", "cpu")):  # initialised where it runs (fast for 1B on a GPU)
        model = LlamaForCausalLM(cfg).eval()
    return model.to(getattr(a, "dtype", torch.float32))


def plan(a, setting, length):
    """[(layer, positions)] per intervention, in config order (pyreft's untied f+l layout)."""
    first, last = list(range(7)), list(range(length - 7, length))
    if setting == "one":
        return [(a.layers // 2, first + last)]
    layers = list(range(a.layers))
    return [(layer, first) for layer in layers] + [(layer, last) for layer in layers]


def representations(lib, a, sites):
    return [{"layer": layer, "component": "block_output", "low_rank_dimension": a.rank,
             "intervention": lib.LoreftIntervention(embed_dim=a.hidden, low_rank_dimension=a.rank,
                                                    dtype=getattr(a, "dtype", torch.float32))}
            for layer, _ in sites]


def grad_from_layer(model, layer):
    """Make layer ``layer``'s output require grad, so the base backward stops where ReFT's does."""
    def hook(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        hidden.requires_grad_()
    return model.model.layers[layer].register_forward_hook(hook)


def timed(fn):
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(fns: dict, repeats: int, warmup: int = 2, baseline: str = "base"):
    """Alternate the callables; per name and clock: median seconds and the median ratio to
    ``baseline`` (also as an overhead in percent).

    CPU time (``time.process_time``) is the robust clock on a shared machine; with one thread it
    is the work done. Wall time is what a user waits for.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    out = {}
    for name, ts in times.items():
        out[name] = {}
        for k, clock in enumerate(("wall", "cpu")):
            mine = [t[k] for t in ts]
            ratio = statistics.median(t[k] / b[k] for t, b in zip(ts, times[baseline]))
            out[name][clock] = {"median_s": statistics.median(mine), "ratio": ratio,
                                "overhead_pct": 100 * (ratio - 1)}
    return out


def train_fns(a, base_model, setting):
    sites = plan(a, setting, a.seq)
    g = torch.Generator().manual_seed(1)
    device = getattr(a, "device", "cpu")
    ids = torch.randint(1, a.vocab, (a.batch, a.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    locs = torch.tensor([[pos for _, pos in sites]] * a.batch).to(device)     # (B, n_int, P)

    base = copy.deepcopy(base_model)
    base.requires_grad_(False)
    grad_from_layer(base, min(layer for layer, _ in sites))

    def base_step():
        base(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()

    ours = reft_kernels.get_reft_model(copy.deepcopy(base_model), reft_kernels.ReftConfig(
        representations=representations(reft_kernels, a, sites)), backend=a.backend)

    def ours_step():
        ours(input_ids=ids, attention_mask=mask, intervention_locations=locs, labels=ids).loss.backward()

    fns = {"base": base_step, "reft_kernels": ours_step}
    if pyreft is not None:
        theirs = pyreft.get_reft_model(copy.deepcopy(base_model), pyreft.ReftConfig(
            representations=representations(pyreft, a, sites)))
        unit = {"sources->base": (None, locs.permute(1, 0, 2).tolist())}

        def pyreft_step():
            theirs({"input_ids": ids, "attention_mask": mask}, unit_locations=unit, labels=ids)[1].loss.backward()
        fns["pyreft"] = pyreft_step
    return fns


def generate_fns(a, base_model, setting):
    sites = plan(a, setting, a.prompt)
    ids = torch.randint(1, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(2))
    ids = ids.to(getattr(a, "device", "cpu"))
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    base = copy.deepcopy(base_model)
    ours = reft_kernels.get_reft_model(copy.deepcopy(base_model), reft_kernels.ReftConfig(
        representations=representations(reft_kernels, a, sites)), backend=a.backend)
    ours.eval()
    unit = {"sources->base": (None, [[pos] for _, pos in sites])}
    fns = {"base": lambda: base.generate(input_ids=ids, **kw),
           "reft_kernels": lambda: ours.generate({"input_ids": ids}, unit_locations=unit,
                                                 intervene_on_prompt=True, **kw)}
    if pyreft is not None:
        theirs = pyreft.get_reft_model(copy.deepcopy(base_model), pyreft.ReftConfig(
            representations=representations(pyreft, a, sites)))
        for iv in theirs.interventions.values():
            iv.eval()
        fns["pyreft"] = lambda: theirs.generate({"input_ids": ids}, unit_locations=unit,
                                                intervene_on_prompt=True, **kw)
    return fns


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work done)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_model.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    base_model = build_model(a)
    results = {}
    for setting in ("one", "all_f7l7"):
        results[f"train/{setting}"] = compare(train_fns(a, base_model, setting), a.repeats)
        with torch.no_grad():
            results[f"generate/{setting}"] = compare(generate_fns(a, base_model, setting), 3 * a.repeats)

    print(f"\nLlama hidden={a.hidden} layers={a.layers} vocab={a.vocab} rank={a.rank}; train batch={a.batch} "
          f"seq={a.seq}; generate prompt={a.prompt} new={a.new_tokens}; threads={a.threads}, "
          f"backend={reft_kernels.ops.resolve_backend(a.backend, torch.device('cpu'))}")
    print(f"{'benchmark':<20}{'provider':<14}{'cpu ms':>9}{'cpu overhead':>14}{'wall ms':>10}{'wall overhead':>15}")
    for bench, rows in results.items():
        for name, r in rows.items():
            c, w = r["cpu"], r["wall"]
            print(f"{bench:<20}{name:<14}{1e3 * c['median_s']:>9.1f}{c['overhead_pct']:>+13.1f}%"
                  f"{1e3 * w['median_s']:>10.1f}{w['overhead_pct']:>+14.1f}%")
    meta = {"args": vars(a), "torch": torch.__version__, "transformers": transformers.__version__,
            "pyreft": getattr(pyreft, "__version__", None) if pyreft else None,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
