"""What each completion of the LoReFT rotation base costs: state memory and training-step time.

For d in (576, 4096) (SmolLM2-135M, 7B-class widths), r = 4, one LoReFT per completion
(``compact``, ``hartley``, ``pyreft``): the bytes of its rotation's parameters and buffers
(including the hartley factors rebuilt from the seed, which are not saved), the bytes it saves
(``state_dict``), and the time of one training step on its own: R materialised, the edit of 10
gathered rows, backward, an AdamW step. Completions alternate within each repetition, one
thread, the median and the minimum of the repetitions (the minimum is the steadier on a shared
machine); ratios to compact are what to read.

    OMP_NUM_THREADS=1 python benchmarks/bench_completions.py    # -> benchmarks/results/completions_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "completions_cost.json")
COMPLETIONS = ("compact", "hartley", "pyreft")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(d: int, r: int, reps: int, rows: int = 10) -> list:
    import reft_kernels as rk
    ivs, opts = {}, {}
    for c in COMPLETIONS:
        torch.manual_seed(0)
        ivs[c] = rk.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dtype=torch.float32, completion=c)
        opts[c] = torch.optim.AdamW([p for p in ivs[c].parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(1, rows, d)
    times = {c: [] for c in COMPLETIONS}
    for i in range(reps + 1):
        for c in COMPLETIONS:
            t0 = time.perf_counter()
            opts[c].zero_grad()
            ivs[c](x, backend="torch").square().mean().backward()
            opts[c].step()
            if i:                                   # the first round warms up
                times[c].append(time.perf_counter() - t0)
    out = []
    for c in COMPLETIONS:
        rot = ivs[c].rotate_layer
        out.append({"d": d, "r": r, "completion": c,
                    "rotation_state_bytes": _bytes(list(rot.parameters()) + list(rot.buffers())),
                    "rotation_saved_bytes": _bytes(rot.state_dict().values()),
                    "step_ms_median": round(1e3 * statistics.median(times[c]), 3),
                    "step_ms_min": round(1e3 * min(times[c]), 3)})
    for stat in ("median", "min"):
        base = next(o[f"step_ms_{stat}"] for o in out if o["completion"] == "compact")
        for o in out:
            o[f"{stat}_over_compact"] = round(o[f"step_ms_{stat}"] / base, 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for d in (576, 4096) for row in measure(d, 4, a.reps)]
    meta = {"torch": torch.__version__, "threads": 1, "reps": a.reps,
            "machine": "shared 2-core CPU (other jobs running): read the ratios"}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    for row in rows:
        print(f"d={row['d']:5d} {row['completion']:8s} state {row['rotation_state_bytes'] / 1024:9.1f} KiB  "
              f"saved {row['rotation_saved_bytes'] / 1024:9.1f} KiB  step median {row['step_ms_median']:8.2f} ms "
              f"(x{row['median_over_compact']:.2f} vs compact), min {row['step_ms_min']:8.2f} ms "
              f"(x{row['min_over_compact']:.2f})")


if __name__ == "__main__":
    main()
