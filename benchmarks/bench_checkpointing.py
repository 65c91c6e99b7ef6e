"""Gradient checkpointing with ReFT interventions: activation memory and step time.

A tiny Llama (random weights, built from a config) with LoReFT on every layer at positions
f7+l7 (untied), one training step (forward + backward + AdamW) on long sequences, in three modes:
no checkpointing, non-reentrant and reentrant checkpointing. Each mode runs in a fresh
subprocess so process-level peaks do not mix. Reported per mode:

* ``saved_MiB`` -- bytes autograd holds for backward at the end of the forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages): the activation memory that
  checkpointing removes. Exact, deterministic.
* ``peak_rss_delta_MiB`` -- process peak RSS during the step minus RSS before it
  (``resource.getrusage``; includes the backward's transient buffers and recomputation).
* ``step_ms`` -- median wall time of a training step.
* ``grad_max_abs_diff`` -- largest difference of the intervention gradients from the
  no-checkpointing run (the edits are re-applied identically on recomputation).

Run: ``python benchmarks/bench_checkpointing.py [--seq 2048] [--batch 2] [--layers 4]``;
writes ``benchmarks/results/checkpointing.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "non_reentrant", "reentrant")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(mode: str, seq: int, batch: int, layers: int, hidden: int, steps: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    import reft_kernels as rk
    from reft_kernels.base_models.tiny import tiny_llama
    from reft_kernels.training.trainer import enable_gradient_checkpointing

    vocab, rank = 1024, 4
    model = tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=8, max_positions=seq, seed=0)
    torch.manual_seed(0)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": rank,
             "intervention": rk.LoreftIntervention(embed_dim=hidden, low_rank_dimension=rank, dtype=torch.float32)}
            for i in list(range(layers)) * 2]
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")
    if mode != "none":
        enable_gradient_checkpointing(reft, use_reentrant=(mode == "reentrant"))
    reft.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :seq // 2] = -100
    first = torch.arange(7).expand(batch, 7)
    last = torch.arange(seq // 2 - 7, seq // 2).expand(batch, 7)
    locs = torch.stack([first] * layers + [last] * layers, dim=1)
    batch_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "intervention_locations": locs}
    opt = torch.optim.AdamW([p for p in reft.parameters() if p.requires_grad], lr=1e-3)

    # 1) saved-for-backward bytes at the end of the forward
    storages = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = reft(**batch_inputs).loss
    saved = sum(storages.values())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in reft.named_parameters() if p.requires_grad}
    opt.zero_grad(set_to_none=True)

    # 2) peak RSS of a step, 3) step time
    rss0 = _rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = reft(**batch_inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    torch.save(grads, os.path.join(os.environ["BENCH_TMP"], f"grads_{mode}.pt"))
    times.sort()
    return {"mode": mode, "saved_MiB": saved / 2**20, "peak_rss_delta_MiB": max(0.0, peak - rss0),
            "step_ms": 1000 * times[len(times) // 2], "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpointing"))
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # internal: one mode in this process
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.seq, args.batch, args.layers, args.hidden, args.steps)))
        return 0

    import tempfile

    import torch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--seq", str(args.seq),
                   "--batch", str(args.batch), "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env={**os.environ, "BENCH_TMP": tmp}, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ref = torch.load(os.path.join(tmp, "grads_none.pt"))
        for row in rows:
            g = torch.load(os.path.join(tmp, f"grads_{row['mode']}.pt"))
            row["grad_max_abs_diff"] = max(float((g[k] - ref[k]).abs().max()) for k in ref)
    meta = {"seq": args.seq, "batch": args.batch, "layers": args.layers, "hidden": args.hidden,
            "interventions": 2 * args.layers, "positions": "f7+l7", "rank": 4, "device": "cpu",
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"Tiny Llama d={args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens, "
             f"LoReFT r=4 on every layer at f7+l7 ({2 * args.layers} interventions), CPU, torch {torch.__version__}",
             "", "| checkpointing | saved for backward (MiB) | peak RSS delta (MiB) | step (ms) | max grad diff |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['saved_MiB']:.1f} | {r['peak_rss_delta_MiB']:.1f} | "
                     f"{r['step_ms']:.0f} | {r['grad_max_abs_diff']:.1e} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
