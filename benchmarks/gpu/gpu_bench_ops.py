"""Op benchmark for the GPU check: every provider of bench_ops.py at the issue's shapes on one GPU.

Providers (bench_ops.providers): pyvene (clone + gather + small ops + scatter, what pyvene does),
eager (the reference formula with autograd), compile (torch.compile of eager), and the torch,
native and triton backends of reft_kernels (in place). LoReFT, rank 4, bf16 hidden, fp32 R.

Per shape x provider x mode (fwd, fwd_bwd, fwd_bwd_hgrad as in bench_ops.py):
  *_ms           median time of a call (CUDA-synchronised timer)
  *_first_s      the first call (compiles, builds, autotuning)
  *_kernels      GPU kernels launched by one call (torch.profiler; memcpy/memset not counted)
  fwd_GBps       minimum traffic of the forward (read + write of the N edited rows, 2*N*d bytes
                 per element size) over the forward time
  fwd_frac_copy  time of a device-to-device copy of those same bytes (an (N, d) tensor) over
                 the forward time: 1.0 means the forward runs at copy speed

    python benchmarks/gpu/gpu_bench_ops.py --json ops.json            # on a GPU: the four shapes
    python benchmarks/gpu/gpu_bench_ops.py --json ops.json --tiny     # on CPU: smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # benchmarks/
from bench_ops import MODES, make_inputs, mode_fns, providers  # noqa: E402

RANK = 4
SHAPES = {  # name: (B, T, P, d)
    "B8_T256_P14_d2048": (8, 256, 14, 2048),
    "B32_T512_P10_d4096": (32, 512, 10, 4096),
    "B16_T2048_P2048_d4096": (16, 2048, 2048, 4096),
    "decode_B64_T1_P1_d4096": (64, 1, 1, 4096),
}
QUICK = ["B8_T256_P14_d2048", "B16_T2048_P2048_d4096", "decode_B64_T1_P1_d4096"]
TINY = {"tiny_B2_T16_P3_d64": (2, 16, 3, 64), "tiny_decode_B4_T1_P1_d64": (4, 1, 1, 64)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, min_run_time):
    """(first call in s, median of later calls in s); the timer synchronises CUDA.

    ``min_run_time <= 0`` (smoke runs): a single timed call after the first.
    """
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    timer = tb.Timer(stmt="fn()", globals={"fn": fn})
    median = timer.timeit(1).median if min_run_time <= 0 else timer.blocked_autorange(min_run_time=min_run_time).median
    return first, median


def kernels_per_call(fn, device):
    """GPU kernels launched by one call of ``fn`` (after a warm-up), None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset", "[memory]")))
    # no device records (a profiler without CUPTI activity): count the host's launch calls
    return kernels or sum(1 for e in events if "LaunchKernel" in e.name)


def copy_seconds(n_elements, dtype, device, min_run_time):
    """Median time of a device-to-device copy of n_elements (read + write, like the forward)."""
    src = torch.randn(n_elements, device=device).to(dtype)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device, min_run_time)[1]


def bench_shape(name, shape, provs, dtype, device, min_run_time, deadline):
    B, T, P, d = shape
    x, pos, R, W, b = make_inputs(B, T, P, d, RANK, dtype, device)
    x0 = x.detach().clone()
    grad = torch.randn_like(x)
    n_rows = int((pos >= 0).sum())       # positions are unique per batch row here
    moved = 2 * n_rows * d * x.element_size()
    t_copy = copy_seconds(n_rows * d, dtype, device, min_run_time)
    rows = []
    for provider, f in provs.items():
        row = dict(shape=name, B=B, T=T, P=P, d=d, r=RANK, dtype=str(dtype).replace("torch.", ""),
                   provider=provider, copy_same_bytes_ms=1e3 * t_copy)
        for mode, fn in mode_fns(f, x, x0, pos, R, W, b, grad).items():
            if time.time() > deadline:
                row[f"{mode}_error"] = "skipped: time budget spent"
                continue
            try:
                first, median = measure(fn, device, min_run_time)
                row[f"{mode}_first_s"], row[f"{mode}_ms"] = first, 1e3 * median
                row[f"{mode}_kernels"] = kernels_per_call(fn, device)
            except Exception as err:  # noqa: BLE001 - record it, go on with the next one
                row[f"{mode}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                print(f"  {name} {provider} {mode}: {row[f'{mode}_error']}", flush=True)
            x.grad = None
            for t in (R, W, b):
                t.grad = None
        if "fwd_ms" in row:
            row["fwd_GBps"] = moved / (row["fwd_ms"] / 1e3) / 1e9
            row["fwd_frac_copy"] = t_copy / (row["fwd_ms"] / 1e3)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def add_speedups(rows):
    """``<mode>_speedup_vs_pyvene`` on every row whose shape has a pyvene row."""
    ref = {r["shape"]: r for r in rows if r["provider"] == "pyvene"}
    for row in rows:
        for mode in MODES:
            pv = ref.get(row["shape"], {})
            if f"{mode}_ms" in row and f"{mode}_ms" in pv:
                row[f"{mode}_speedup_vs_pyvene"] = pv[f"{mode}_ms"] / row[f"{mode}_ms"]


def format_row(r):
    s = f"{r['shape']:<24} {r['provider']:<8}"
    for m in MODES:
        s += f"  {m} {r[m + '_ms']:9.4f} ms" if f"{m}_ms" in r else f"  {m} {'error':>12}"
        if r.get(f"{m}_kernels") is not None:
            s += f" ({r[m + '_kernels']} kernels)"
    if "fwd_frac_copy" in r:
        s += f"  fwd {r['fwd_GBps']:.1f} GB/s = {r['fwd_frac_copy']:.2f} x copy"
    return s


def run(device, dtype, shapes, min_run_time, deadline, compile_backend="inductor", interpreted_triton=False):
    """All shapes; returns (rows, errors). Two passes over the shapes: ours and pyvene first, then
    eager and compile (whose compiles are slow), so a spent time budget costs baselines first."""
    provs = providers(device, compile_backend=compile_backend, interpreted_triton=interpreted_triton)
    passes = [["triton", "native", "torch", "pyvene"], ["eager", "compile"]]
    rows, errors = [], []
    for names in passes:
        subset = {k: provs[k] for k in names if k in provs}
        for name, shape in shapes.items():
            if time.time() > deadline:
                errors.append(f"{name} {'/'.join(subset)}: skipped, time budget spent")
                continue
            try:
                rows += bench_shape(name, shape, subset, dtype, device, min_run_time, deadline)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory; the next shape may still run
                errors.append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
                print(f"  {errors[-1]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    order = {k: i for i, k in enumerate(sum(passes, []))}
    rows.sort(key=lambda r: (list(shapes).index(r["shape"]), order.get(r["provider"], len(order))))
    add_speedups(rows)
    errors += [f"{r['shape']} {r['provider']} {m}: {r[m + '_error']}" for r in rows for m in MODES
               if f"{m}_error" in r and not r[f"{m}_error"].startswith("skipped")]
    return rows, errors


def parse_bench_args(doc: str, argv, budget_s: float, tiny_help: str, quick_help: str = "shorter run"):
    """The GPU benchmarks' shared command line -> (args, device, deadline); --tiny is the CPU smoke run."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--budget-s", type=float, default=budget_s, help="stop starting new timings after this")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    return args, device, time.time() + args.budget_s


def write_results(path: str, device, errors, counted: str, **results) -> int:
    """Write ``{device, **results, errors}`` as JSON and say how many ``results[counted]`` it holds;
    exit code 1 if any timing failed."""
    with open(path, "w") as f:
        json.dump(dict(device=str(device), **results, errors=errors), f, indent=1)
    print(f"wrote {path} ({len(results[counted])} {counted}, {len(errors)} errors)")
    return 1 if errors else 0


def main(argv=None):
    args, device, deadline = parse_bench_args(__doc__, argv, 240, "CPU smoke run: tiny shapes, interpreted triton",
                                              "three shapes, shorter timing")
    if args.tiny:
        rows, errors = run(device, torch.float32, TINY, 0, deadline, compile_backend="eager",
                           interpreted_triton=os.environ.get("TRITON_INTERPRET") == "1")
    else:
        shapes = {k: SHAPES[k] for k in QUICK} if args.quick else SHAPES
        rows, errors = run(device, torch.bfloat16, shapes, 0.05 if args.quick else 0.2, deadline)
    return write_results(args.json, device, errors, "rows", rows=rows)


if __name__ == "__main__":
    sys.exit(main())
