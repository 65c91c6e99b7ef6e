"""Cost of mixing adapters in one batch: reft_edit_multi over 16 adapters vs one adapter.

For each backend (CPU: native and torch; triton on a GPU only) and shape, the same batch is edited
(LoReFT, positions of every row, fp32) by

  single     reft_edit with one (r, d) adapter: today's single-adapter op
  multi_a1   reft_edit_multi with a stack of A = 1 (every row id 0)
  multi_a16  reft_edit_multi with a stack of A = 16, rows spread evenly over the 16 adapters
             (shuffled, so neighbouring rows use different adapters)

timed forward (no_grad) and forward+backward (gradients of hidden and of every weight). The
target of issue 10 is multi_a16 <= 1.15 x single. Configurations are timed round-robin, several
rounds, and the median per configuration is kept, so that load changes on a shared machine hit
every configuration alike; a ratio is the median over rounds of the per-round ratio (the cases
of one round run back to back). Ratios are the meaningful numbers, not the absolute times.

    python benchmarks/bench_rowop.py                       # writes benchmarks/results/rowop_cpu.json
    python benchmarks/bench_rowop.py --rounds 3 --quick    # one small shape, fast
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reft_kernels.ops import reft_edit, reft_edit_multi  # noqa: E402
from reft_kernels.ops.autograd import get_backend  # noqa: E402

# (B, T, P, d, r): SmolLM2-135M-like width with LoReFT r=4; a 2k-wide model with r=8
SHAPES = [(64, 64, 8, 576, 4), (32, 128, 8, 2048, 8)]
QUICK = [(32, 32, 8, 576, 4)]
N_ADAPTERS = 16


def make_case(B, T, P, d, r, n_adapters, device, gen):
    hidden = torch.randn(B, T, d, generator=gen).to(device)
    positions = torch.stack([torch.randperm(T, generator=gen)[:P] for _ in range(B)]).to(device)
    R = torch.linalg.qr(torch.randn(n_adapters, d, r, generator=gen))[0].transpose(1, 2)
    W = torch.randn(n_adapters, r, d, generator=gen) / d ** 0.5
    b = torch.randn(n_adapters, r, generator=gen)
    ids = (torch.arange(B) % n_adapters)[torch.randperm(B, generator=gen)]
    return hidden, positions, ids.to(device), [t.contiguous().to(device) for t in (R, W, b)]


def providers(shape, backend, device):
    B, T, P, d, r = shape
    gen = torch.Generator().manual_seed(0)
    hidden, positions, ids16, stack16 = make_case(B, T, P, d, r, N_ADAPTERS, device, gen)
    stack1 = [t[:1].clone() for t in stack16]
    single = [t[0].clone() for t in stack16]
    ids1 = torch.zeros_like(ids16)
    return {
        "single": (lambda h, ws: reft_edit(h, positions, ws[0], ws[1], ws[2], backend=backend), single),
        "multi_a1": (lambda h, ws: reft_edit_multi(h, positions, ids1, *ws, backend=backend), stack1),
        "multi_a16": (lambda h, ws: reft_edit_multi(h, positions, ids16, *ws, backend=backend), stack16),
    }, hidden


def step(fn, hidden, weights, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(hidden, weights)
        return
    h = hidden.detach().requires_grad_(True)
    ws = [w.detach().requires_grad_(True) for w in weights]
    out = fn(h * 1.0, ws)
    torch.autograd.backward(out, out.detach())


def time_round_robin(cases, rounds, min_time):
    """{name: [seconds per call, one per round]}; each round times every case for >= min_time in turn."""
    samples = {name: [] for name in cases}
    for name, run in cases.items():   # warm-up (builds, allocator)
        run(), run()
    for _ in range(rounds):
        for name, run in cases.items():
            n, t0 = 0, time.perf_counter()
            while True:
                run()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_time:
                    break
            samples[name].append(elapsed / n)
    return samples


def median_ratio(samples, num, den):
    """Median over rounds of the per-round ratio: robust to load drifting between rounds."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: steadier on a shared machine; OpenMP barriers spin under load)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rowop_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch"]
    for name in ("native", "triton"):
        try:
            ok = get_backend(name).is_available(device)
        except Exception:  # noqa: BLE001
            ok = False
        if ok and not (name == "triton" and device.type != "cuda"):   # no interpreter timings
            backends.append(name)
    results = []
    load_before = os.getloadavg()
    for shape in (QUICK if args.quick else SHAPES):
        for backend in backends:
            for mode in ("fwd", "fwd_bwd"):
                provs, hidden = providers(shape, backend, device)
                cases = {name: (lambda f=f, w=w: step(f, hidden, w, mode)) for name, (f, w) in provs.items()}
                samples = time_round_robin(cases, args.rounds, args.min_time)
                t = {k: statistics.median(v) for k, v in samples.items()}
                row = dict(shape=dict(zip("BTPdr", shape)), backend=backend, mode=mode,
                           seconds={k: round(v, 7) for k, v in t.items()},
                           ratio_a16_vs_single=round(median_ratio(samples, "multi_a16", "single"), 3),
                           ratio_a16_vs_a1=round(median_ratio(samples, "multi_a16", "multi_a1"), 3),
                           ratio_a1_vs_single=round(median_ratio(samples, "multi_a1", "single"), 3),
                           samples={k: [round(x, 7) for x in v] for k, v in samples.items()})
                results.append(row)
                print(f"{shape} {backend:6s} {mode:7s} single {t['single']*1e3:8.3f} ms  a1 "
                      f"{t['multi_a1']*1e3:8.3f} ms  a16 {t['multi_a16']*1e3:8.3f} ms  "
                      f"a16/single {row['ratio_a16_vs_single']:.3f}  a16/a1 {row['ratio_a16_vs_a1']:.3f}",
                      flush=True)
    meta = dict(device=str(device), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
                loadavg_before=load_before, loadavg_after=os.getloadavg(),
                note="shared machine (other jobs running): compare ratios, not absolute times",
                rounds=args.rounds, min_time=args.min_time, n_adapters=N_ADAPTERS, dtype="float32",
                variant="loreft", target="multi_a16 <= 1.15 x single")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
