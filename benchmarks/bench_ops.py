"""Microbenchmark of the fused ReFT op (LoReFT) against the baselines, side by side in one run.

Providers (each computes the same edit and, for fwd+bwd, the gradients of hidden, R, W and b):
  pyvene     what pyvene does per call: clone the whole hidden state, gather, small ops, scatter
  eager      reference formula on gathered rows with autograd (reft_kernels.ops.reference)
  compile    torch.compile(eager)
  torch      reft_kernels.ops.loreft(backend="torch"): hand-derived backward, in place
  native     backend="native" (csrc/), when it builds
  triton     backend="triton", on a GPU only

Timings (ratios against pyvene, higher is faster; GB/s and % of measured copy bandwidth on a
GPU only):
  fwd            forward under no_grad
  fwd_bwd        forward+backward when hidden needs no gradient (lowest edited layer of a frozen
                 model): R, W, b gradients
  fwd_bwd_hgrad  forward+backward including hidden's gradient; every provider starts from the same
                 fresh non-leaf ``x + 0`` (a layer output), so in-place providers pay no extra copy
                 and nobody gets a free one; that producer's cost is included for all, and
                 "op only" subtracts the producer's separately measured time.

    python benchmarks/bench_ops.py --quick            # the issue's CPU target shapes
    python benchmarks/bench_ops.py                    # full sweep
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reft_kernels.ops import loreft  # noqa: E402
from reft_kernels.ops.autograd import get_backend  # noqa: E402
from reft_kernels.ops.reference import edit_rows_reference, pyvene_style  # noqa: E402

FULL_SHAPES = [(8, 256, 14), (32, 512, 14), (16, 2048, 2048)]
QUICK = [((8, 256, 14), 2048, 4), ((16, 2048, 2048), 2048, 4), ((32, 512, 10), 4096, 4)]


def eager(hidden, positions, R, W, b):
    """Gather -> reference formula -> out-of-place scatter; positions unique and in range."""
    B, T, d = hidden.shape
    rows = (positions + torch.arange(B, device=hidden.device).unsqueeze(1) * T).reshape(-1)
    flat = hidden.reshape(B * T, d)
    new = edit_rows_reference(flat.index_select(0, rows), R, W, b, None, variant="loreft")
    return flat.index_copy(0, rows, new).view(B, T, d)


def providers(device, compile_backend="inductor", interpreted_triton=False):
    """name -> fn(hidden, positions, R, W, b). ``interpreted_triton``: include triton on CPU too
    (under TRITON_INTERPRET=1; for smoke runs, its times mean nothing)."""
    torch._dynamo.config.recompile_limit = 256  # one graph per shape and grad mode
    out = {
        "pyvene": lambda h, p, R, W, b: pyvene_style(h, p, R, W, b),
        "eager": eager,
        "compile": torch.compile(eager, dynamic=False, backend=compile_backend),
        "torch": lambda h, p, R, W, b: loreft(h, p, R, W, b, inplace=True, backend="torch"),
    }
    for name in ("native", "triton"):
        try:
            ok = get_backend(name).is_available(device)
        except Exception:  # noqa: BLE001
            ok = False
        if ok and not (name == "triton" and device.type != "cuda" and not interpreted_triton):
            out[name] = (lambda n: lambda h, p, R, W, b: loreft(h, p, R, W, b, inplace=True, backend=n))(name)
    return out


def make_inputs(B, T, P, d, r, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=g).to(device, dtype).requires_grad_(True)
    positions = torch.stack([torch.randperm(T, generator=g)[:P] for _ in range(B)]).to(device)
    R = torch.linalg.qr(torch.randn(d, r, generator=g))[0].t().contiguous().to(device).requires_grad_(True)
    W = (torch.randn(r, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_(True)
    b = torch.randn(r, generator=g).to(device, dtype).requires_grad_(True)
    return x, positions, R, W, b


def time_fn(fn, device, min_run_time):
    fn()  # warm-up (compiles, builds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth (GB/s) on a GPU, None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    t = time_fn(lambda: a.clone(), device, 0.5)
    return 2 * a.numel() / t / 1e9


MODES = ("fwd", "fwd_bwd", "fwd_bwd_hgrad")


def mode_fns(f, x, x0, pos, R, W, b, grad):
    """The three timed calls of provider ``f`` (see ``bench``), by mode."""
    def fwd():
        with torch.no_grad():
            f(x0.detach(), pos, R, W, b)

    def fwd_bwd():
        torch.autograd.backward(f(x0.detach(), pos, R, W, b), grad)

    def fwd_bwd_hgrad():
        torch.autograd.backward(f(x + 0, pos, R, W, b), grad)
    return dict(fwd=fwd, fwd_bwd=fwd_bwd, fwd_bwd_hgrad=fwd_bwd_hgrad)


def bench(shapes, dtype, device, min_run_time):
    """Three timings per provider and shape (see the module docstring):

    fwd            forward under no_grad, on the hidden state itself
    fwd_bwd        forward + backward, hidden needs no gradient (the lowest edited layer of a
                   frozen model): gradients of R, W, b
    fwd_bwd_hgrad  forward + backward including the gradient of hidden; the input is a fresh
                   non-leaf ``x + 0`` (as a layer output would be), whose cost every provider pays
    """
    provs = providers(device)
    bw = copy_bandwidth(device)
    rows = []
    for (B, T, P), d, r in shapes:
        x, pos, R, W, b = make_inputs(B, T, P, d, r, dtype, device)
        x0 = x.detach().clone()
        grad = torch.randn_like(x)
        res = {}
        for name, f in provs.items():
            fns = mode_fns(f, x, x0, pos, R, W, b, grad)
            res[name] = [time_fn(fns[mode], device, min_run_time) for mode in MODES]
        # the producer alone (x + 0 and its backward), to report the op's own share of hgrad
        producer = time_fn(lambda: torch.autograd.backward(x + 0, grad), device, min_run_time)
        moved = 2 * B * P * d * x.element_size()  # read + write of the edited rows
        for name, times in res.items():
            row = dict(B=B, T=T, P=P, d=d, r=r, dtype=str(dtype).replace("torch.", ""), provider=name)
            for mode, t, t_pv in zip(MODES, times, res["pyvene"]):
                row[f"{mode}_ms"] = t * 1e3
                row[f"{mode}_speedup_vs_pyvene"] = t_pv / t
            row["hgrad_op_only_speedup_vs_pyvene"] = (res["pyvene"][2] - producer) / max(times[2] - producer, 1e-9)
            if bw is not None:
                row["fwd_GBps"] = moved / times[0] / 1e9
                row["fwd_pct_copy_bw"] = 100 * row["fwd_GBps"] / bw
            rows.append(row)
            print(format_row(row, device), flush=True)
    return rows, bw


def format_row(r, device):
    s = f"B={r['B']:<3} T={r['T']:<5} P={r['P']:<5} d={r['d']:<5} r={r['r']:<3} {r['provider']:<8}"
    s += "".join(f"  {m} x{r[m + '_speedup_vs_pyvene']:6.2f}" for m in MODES)
    s += f"  (hgrad op only x{r['hgrad_op_only_speedup_vs_pyvene']:6.2f})"
    if device.type == "cuda":
        s += "".join(f"  {m} {r[m + '_ms']:.4f} ms" for m in MODES)
        s += f"  {r['fwd_GBps']:.0f} GB/s ({r['fwd_pct_copy_bw']:.0f}% of copy)"
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the issue's target shapes")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = QUICK if args.quick else [(s, d, r) for s, d, r in itertools.product(FULL_SHAPES, [768, 2048, 4096], [1, 4, 16])]
    if device.type == "cpu":
        print("CPU run: ratios only (absolute times are reported from a GPU).")
    rows, bw = bench(shapes, dtype, device, args.min_run_time)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, copy_GBps=bw,
                date=time.strftime("%Y-%m-%d"), note="ratios vs pyvene-style path; higher is faster")
    if device.type == "cpu":  # absolute CPU times are not reported
        for r in rows:
            for m in MODES:
                r.pop(f"{m}_ms")
    path = args.out or os.path.join(os.path.dirname(__file__), "results", f"ops_{device.type}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
