"""Cost of the rotation R: forward + backward of ``rotate_layer.weight``, per parametrisation.

For d in {576, 2048, 4096} and r in {4, 16}, one fp32 rotation on the CPU, the time of
``R = rot.weight; (R * M).sum().backward()`` (what one training step pays for R) for:

* ``householder``   -- the default: pyreft's Householder map, base kept as r reflectors (O(d r^2));
* ``householder_full_base`` -- the same map with pyreft's d x d base (as after loading pyreft's
  full state dict; O(d^2 r), what pyreft pays per access -- three accesses per LoReFT forward);
* ``cholesky_qr``   -- the opt-in map (fp64 Gram matrix + Cholesky + triangular solve);
* ``torch_orthogonal`` -- pyreft's own module (``torch.nn.utils.parametrizations.orthogonal``,
  same state as ``householder_full_base``): LAPACK's ``householder_product``, whose backward
  dominates; for reference, and pyreft pays it per access.

Rounds alternate the maps (so load on a shared machine hits them alike); the median of each is
reported with the ratio to ``householder`` and the bytes of state (parameters + buffers).

Run: ``python benchmarks/bench_rotation.py [--rounds 30] [--threads 1]``; writes
``benchmarks/results/rotation_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from reft_kernels.interventions.rotation import OrthonormalRotation  # noqa: E402

MAPS = ("householder", "householder_full_base", "cholesky_qr", "torch_orthogonal")


class _TorchOrthogonal(torch.nn.Module):
    """pyreft's rotate_layer (d, r) holding the given state; ``.weight`` as ours, (r, d)."""

    def __init__(self, original, base):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.weight = torch.nn.Parameter(original.clone())
        torch.nn.utils.parametrizations.orthogonal(self.inner)
        with torch.no_grad():
            self.inner.parametrizations.weight.original.copy_(original)
            self.inner.parametrizations.weight[0].base.copy_(base)

    @property
    def weight(self):
        return self.inner.weight.T


def build(kind: str, d: int, r: int):
    torch.manual_seed(0)
    rot = OrthonormalRotation(d, r, "cholesky_qr" if kind == "cholesky_qr" else "householder")
    if kind == "torch_orthogonal":
        return _TorchOrthogonal(*rot.pyreft_state())
    if kind == "householder_full_base":
        original, base = rot.pyreft_state()
        rot.load_state_dict({"parametrizations.weight.original": original,
                             "parametrizations.weight.0.base": base})
    return rot


def step(rot, mix: torch.Tensor) -> float:
    t0 = time.perf_counter()
    (rot.weight * mix).sum().backward()
    elapsed = time.perf_counter() - t0
    for p in rot.parameters():
        p.grad = None
    return elapsed


def run(d: int, r: int, rounds: int) -> dict:
    rots = {k: build(k, d, r) for k in MAPS}
    mix = torch.randn(r, d)
    for rot in rots.values():  # warm-up
        step(rot, mix)
    times = {k: [] for k in MAPS}
    for _ in range(rounds):
        for k, rot in rots.items():
            times[k].append(step(rot, mix))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    state = {k: sum(t.numel() * t.element_size() for t in list(rot.parameters()) + list(rot.buffers()))
             for k, rot in rots.items()}
    return {"d": d, "r": r,
            **{f"{k}_ms": round(med[k], 4) for k in MAPS},
            **{f"{k}_over_householder": round(med[k] / med["householder"], 3) for k in MAPS[1:]},
            **{f"{k}_state_bytes": state[k] for k in MAPS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "rotation_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in (576, 2048, 4096):
        for r in (4, 16):
            rows.append(run(d, r, args.rounds))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"device": "cpu", "torch_threads": args.threads, "rounds": args.rounds,
            "python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "note": "one run on a shared 2-core machine under load from other jobs: compare the "
                    "ratios, not the absolute times"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
