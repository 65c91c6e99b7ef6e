"""Launch-bound prep for the GPU check: decode-step latency per backend, eager vs CUDA graph.

At decode sizes (B=64 rows of d=4096, one position each) the op moves ~1 MB: its time is launch
latency and host overhead, not bandwidth. Per backend (torch, native, triton), forward under
no_grad, bf16 hidden, fp32 R, bf16 W and b:

  eager_ms        median time of one synchronised call (host overhead + launches + kernels)
  enqueue_us      host time per call of 200 back-to-back calls without a sync (what the CPU
                  spends issuing a call: the floor for eager decode)
  graph_ms        median time of replaying the same call captured in a CUDA graph
                  (torch.cuda.CUDAGraph), i.e. with the launch overhead removed
  graph_error     why capture failed, if it did (a host sync or allocation in the call)
  kernels         kernels per call (torch.profiler)

plus the same eager/enqueue numbers at a minimal shape (B=1, T=1, d=64): the backend's fixed
launch latency, native (C++ launcher) against Triton's (Python launcher).

    python benchmarks/gpu/gpu_launch.py --json launch.json           # on a GPU
    python benchmarks/gpu/gpu_launch.py --json launch.json --tiny    # CPU smoke run (no graphs)
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))   # the repository
from gpu_bench_ops import kernels_per_call, measure, parse_bench_args, sync, write_results  # noqa: E402
from reft_kernels.ops import loreft  # noqa: E402
from reft_kernels.ops.autograd import get_backend_safely  # noqa: E402

DECODE = (64, 4096)      # (B, d) with T = P = 1
MINIMAL = (1, 64)


def available(device, interpreted_triton=False):
    names = ["torch"]
    for name in ("native", "triton"):
        mod = get_backend_safely(name)
        if mod is not None and mod.is_available(device) and (device.type == "cuda" or name != "triton"
                                                              or interpreted_triton):
            names.append(name)
    return names


def decode_inputs(B, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, 1, d, generator=g).to(device, dtype)
    positions = torch.zeros(B, 1, dtype=torch.long, device=device)
    R = torch.linalg.qr(torch.randn(d, 4, generator=g))[0].t().contiguous().to(device)
    W = (torch.randn(4, d, generator=g) / d ** 0.5).to(device, dtype)
    b = torch.randn(4, generator=g).to(device, dtype)
    return hidden, positions, R, W, b


def enqueue_us(fn, device, calls):
    """Host microseconds per call of ``calls`` back-to-back calls, synchronising only at the end."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync(device)
    return 1e6 * host / calls


def graph_replay_ms(fn, device, min_run_time):
    """Capture one call of ``fn`` in a CUDA graph and time its replay (ms)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):            # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * measure(graph.replay, device, min_run_time)[1]


def bench_backend(backend, shape, dtype, device, min_run_time, calls):
    hidden, positions, R, W, b = decode_inputs(*shape, dtype, device)

    def call():
        with torch.no_grad():
            loreft(hidden, positions, R, W, b, inplace=True, backend=backend)
    row = dict(backend=backend, B=shape[0], T=1, P=1, d=shape[1], dtype=str(dtype).replace("torch.", ""))
    try:
        row["eager_ms"] = 1e3 * measure(call, device, min_run_time)[1]
        row["enqueue_us"] = enqueue_us(call, device, calls)
        row["kernels"] = kernels_per_call(call, device)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row, call


def add_graph(row, call, device, min_run_time):
    try:
        row["graph_ms"] = graph_replay_ms(call, device, min_run_time)
        row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
    except Exception as err:  # noqa: BLE001 - a finding, not a crash
        row["graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"


def format_row(r):
    s = f"{r['backend']:<7} B={r['B']:<3} d={r['d']:<5}"
    if "error" in r:
        return s + f"  error: {r['error']}"
    s += f"  eager {r['eager_ms']:.4f} ms  enqueue {r['enqueue_us']:.1f} us/call"
    if r.get("kernels") is not None:
        s += f"  {r['kernels']} kernels"
    if "graph_ms" in r:
        s += f"  graph {r['graph_ms']:.4f} ms (x{r['graph_speedup']:.1f})"
    elif "graph_error" in r:
        s += f"  graph capture failed: {r['graph_error']}"
    return s


def run(device, dtype, shapes, min_run_time, calls, deadline, interpreted_triton=False):
    """Eager rows for every shape and backend first; then CUDA-graph replays of the decode shape,
    triton first (a failed capture can leave the process's CUDA state unusable for the rest)."""
    rows, errors, calls_by_row = [], [], []
    for label, shape in shapes.items():
        for backend in available(device, interpreted_triton):
            if time.time() > deadline:
                errors.append(f"{label} {backend}: skipped, time budget spent")
                continue
            row, call = bench_backend(backend, shape, dtype, device, min_run_time, calls)
            row["shape"] = label
            rows.append(row)
            calls_by_row.append(call)
            if "error" in row:
                errors.append(f"{label} {backend}: {row['error']}")
    if device.type == "cuda":
        order = {"triton": 0, "native": 1, "torch": 2}
        decode = [(r, c) for r, c in zip(rows, calls_by_row) if r["shape"] == "decode" and "error" not in r]
        for row, call in sorted(decode, key=lambda rc: order[rc[0]["backend"]]):
            if time.time() < deadline:
                add_graph(row, call, device, min_run_time)
    for row in rows:
        print(format_row(row), flush=True)
    return rows, errors


def main(argv=None):
    args, device, deadline = parse_bench_args(__doc__, argv, 60, "CPU smoke run")
    if args.tiny:
        # triton left out: interpreted, it costs seconds a call and the code path is the same
        rows, errors = run(device, torch.float32, {"decode": (4, 64), "minimal": MINIMAL}, 0, 3, deadline)
    else:
        rows, errors = run(device, torch.bfloat16, {"decode": DECODE, "minimal": MINIMAL},
                           0.05 if args.quick else 0.2, 200, deadline)
    return write_results(args.json, device, errors, "rows", rows=rows)


if __name__ == "__main__":
    sys.exit(main())
