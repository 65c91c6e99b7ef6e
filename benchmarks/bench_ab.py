"""A/B timing of two source trees (a change against its parent): the op and the model-level step.

Each round starts one worker process per tree (the order alternates between rounds). A worker
imports ``reft_kernels`` from its tree (the timing code is this file and bench_model.py, the same
for both), pins one torch thread, runs every case ``--repeats`` times and reports each case's
minimum process CPU time (one thread: the work done, robust to preemption on a shared machine). Per case the minimum over rounds is kept, so a machine whose load comes and goes costs
rounds, not accuracy. Reported: new/old per case, their geometric mean, and the load average
before and after (a loaded machine inflates both trees alike but widens the noise).

Cases (CPU):
  op/<backend>/<mode>/<shape>   ``ops.loreft`` on (B, T, P, d, r): fwd (no_grad) and fwd_bwd
                                (gradients of hidden, R, W, b); tiny shapes show per-call overhead
  model/<step>/<setting>/<size> bench_model.py's ReFT training step (forward + backward of the LM
                                loss) and greedy generate, "one" and "all_f7l7" interventions, on
                                a tiny Llama and on bench_model.py's default size

    python benchmarks/bench_ab.py --old OLD_TREE [--new NEW_TREE] --rounds 8 --out results/x.json

``--inprocess`` (model-level cases only, when both trees have the same ``reft_kernels/ops``):
one process imports the new tree as ``reft_kernels`` and the old as ``reft_kernels_old`` (the
old one's ``ops`` is the new one's: the op's custom ops register once), and each repeat calls
old and new back to back (order alternating), so both see the same load; reported per case:
min CPU time per side and the median of the paired new/old ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
OP_SHAPES = {"tiny": (1, 16, 2, 64, 4), "issue_8x256": (8, 256, 14, 2048, 4)}
MODEL_SIZES = {"tiny": dict(hidden=128, layers=2, seq=64, batch=2, vocab=512, prompt=32, new_tokens=8),
               "mid": dict(hidden=256, layers=2, seq=128, batch=2, vocab=2048, prompt=64, new_tokens=16),
               "default": dict(hidden=512, layers=4, seq=256, batch=4, vocab=8192, prompt=128, new_tokens=32)}


def _best(fn, repeats: int) -> float:
    """Minimum process CPU seconds of one call: with one thread that is the work done, which a
    loaded machine's preemption does not inflate (wall time would)."""
    fn()                                   # warm-up (builds, caches)
    best = math.inf
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def _op_cases(torch, repeats: int) -> dict:
    from reft_kernels.ops import loreft
    from reft_kernels.ops.autograd import get_backend
    out = {}
    backends = ["torch"] + (["native"] if get_backend("native").is_available(torch.device("cpu")) else [])
    for shape_name, (B, T, P, d, r) in OP_SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, d, generator=g, requires_grad=True)
        pos = torch.stack([torch.randperm(T, generator=g)[:P] for _ in range(B)])
        R = torch.linalg.qr(torch.randn(d, r, generator=g))[0].t().contiguous().requires_grad_(True)
        W = (torch.randn(r, d, generator=g) / d ** 0.5).requires_grad_(True)
        b = torch.randn(r, generator=g).requires_grad_(True)
        grad = torch.randn(B, T, d, generator=g)
        for backend in backends:
            def fwd():
                with torch.no_grad():
                    loreft(x.detach(), pos, R, W, b, backend=backend)

            def fwd_bwd():
                torch.autograd.backward(loreft(x + 0, pos, R, W, b, inplace=True, backend=backend), grad)
            for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                out[f"op/{backend}/{mode}/{shape_name}"] = _best(fn, repeats * (20 if shape_name == "tiny" else 1))
    return out


def _model_cases(torch, repeats: int, sizes) -> dict:
    sys.path.insert(0, HERE)
    import bench_model
    out = {}
    for size in sizes:
        a = SimpleNamespace(rank=4, backend="auto", **MODEL_SIZES[size])
        base_model = bench_model.build_model(a)
        for setting in ("one", "all_f7l7"):
            fns = bench_model.train_fns(a, base_model, setting)
            for name in ("reft_kernels", "base"):
                out[f"model/train/{setting}/{size}/{name}"] = _best(fns[name], repeats)
            with torch.no_grad():
                fns = bench_model.generate_fns(a, base_model, setting)
                for name in ("reft_kernels", "base"):
                    out[f"model/generate/{setting}/{size}/{name}"] = _best(fns[name], repeats)
    return out


def worker(tree: str, repeats: int, sizes) -> None:
    sys.path.insert(0, os.path.abspath(tree))
    import torch
    torch.set_num_threads(1)
    import reft_kernels
    assert os.path.dirname(os.path.dirname(os.path.abspath(reft_kernels.__file__))) == os.path.abspath(tree)
    times = _op_cases(torch, repeats)
    times.update(_model_cases(torch, repeats, sizes))
    print("AB_RESULT " + json.dumps(times), flush=True)


def _load_as(tree: str, alias: str, shared_ops: str):
    """Import ``tree``'s reft_kernels as ``alias``, its ``ops`` (and submodules) taken from the
    already imported ``shared_ops`` package."""
    import importlib
    import importlib.util
    import pkgutil
    ops = importlib.import_module(shared_ops)
    for info in pkgutil.iter_modules(ops.__path__):
        try:
            importlib.import_module(f"{shared_ops}.{info.name}")
        except ImportError:      # triton on a CPU-only machine
            pass
    for name in [n for n in sys.modules if n == shared_ops or n.startswith(shared_ops + ".")]:
        sys.modules[alias + ".ops" + name[len(shared_ops):]] = sys.modules[name]
    package = os.path.join(os.path.abspath(tree), "reft_kernels")
    spec = importlib.util.spec_from_file_location(alias, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def inprocess(args) -> dict:
    """Model-level cases, old and new interleaved in one process (see the module docstring)."""
    import copy
    import statistics
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.abspath(args.new))
    import reft_kernels as new
    old = _load_as(args.old, "reft_kernels_old", "reft_kernels.ops")
    print(f"old: {os.path.dirname(old.__file__)}, new: {os.path.dirname(new.__file__)}", flush=True)
    sys.path.insert(0, HERE)
    import bench_model
    results = {}
    for size in args.sizes:
        a = SimpleNamespace(rank=4, backend="auto", **MODEL_SIZES[size])
        base_model = bench_model.build_model(a)
        for setting in ("one", "all_f7l7"):
            sites = bench_model.plan(a, setting, a.seq)
            ids = torch.randint(1, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
            locs = torch.tensor([[pos for _, pos in sites]] * a.batch)
            psites = bench_model.plan(a, setting, a.prompt)
            prompt = ids[:1, :a.prompt]
            unit = {"sources->base": (None, [[pos] for _, pos in psites])}
            kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
            steps = {}
            for side, lib in (("old", old), ("new", new)):
                torch.manual_seed(0)
                train = lib.get_reft_model(copy.deepcopy(base_model), lib.ReftConfig(
                    representations=bench_model.representations(lib, a, sites)), backend=a.backend)
                torch.manual_seed(0)
                gen = lib.get_reft_model(copy.deepcopy(base_model), lib.ReftConfig(
                    representations=bench_model.representations(lib, a, psites)), backend=a.backend).eval()
                steps[side] = {
                    "train": (lambda m=train: m(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                 intervention_locations=locs, labels=ids).loss.backward()),
                    "generate": (lambda m=gen: m.generate({"input_ids": prompt}, unit_locations=unit,
                                                          intervene_on_prompt=True, **kw))}
            for step in ("train", "generate"):
                times = {"old": [], "new": []}
                with torch.set_grad_enabled(step == "train"):
                    for k in range(2 + args.rounds * args.repeats):
                        for side in (("old", "new") if k % 2 == 0 else ("new", "old")):
                            t = time.process_time()
                            steps[side][step]()
                            times[side].append(time.process_time() - t)
                t_old, t_new = times["old"][2:], times["new"][2:]   # 2 warm-up calls each
                case = f"model/{step}/{setting}/{size}"
                results[case] = {"old_min_s": min(t_old), "new_min_s": min(t_new),
                                 "min_ratio": min(t_new) / min(t_old),
                                 "median_paired_ratio": statistics.median(n / o for n, o in zip(t_new, t_old))}
                r = results[case]
                print(f"{case:<34}{1e3 * r['old_min_s']:>9.3f} ms{1e3 * r['new_min_s']:>9.3f} ms   min new/old "
                      f"{r['min_ratio']:.3f}   median paired {r['median_paired_ratio']:.3f}", flush=True)
    return results


def _run(tree: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(tree)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tree, "--repeats", str(args.repeats),
           "--sizes", *args.sizes]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("AB_RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"worker for {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("AB_RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="the tree before the change (a checkout with reft_kernels/)")
    ap.add_argument("--new", default=os.path.dirname(HERE), help="the tree after it (default: this one)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case in one worker (min kept)")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(MODEL_SIZES),
                    help="model sizes (default: tiny and mid; 'default' is bench_model.py's)")
    ap.add_argument("--out", default=None, help="JSON path for the per-case results")
    ap.add_argument("--inprocess", action="store_true", help="model-level cases, old and new in one process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.repeats, args.sizes)
    if not args.old:
        ap.error("--old is required")
    if args.inprocess:
        load_before = os.getloadavg()
        results = inprocess(args)
        geomean = {k: math.exp(sum(math.log(r[k]) for r in results.values()) / len(results))
                   for k in ("min_ratio", "median_paired_ratio")}
        print(f"geomean new/old: {geomean}; load average before {load_before}, after {os.getloadavg()}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": {"mode": "inprocess", "calls_per_side": args.rounds * args.repeats, "threads": 1,
                                    "clock": "process CPU", "loadavg_before": load_before,
                                    "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")},
                           "cases": results, "geomean": geomean}, f, indent=1)
        return None
    load_before = os.getloadavg()
    best = {"old": {}, "new": {}}
    for k in range(args.rounds):
        for side in (("old", "new") if k % 2 == 0 else ("new", "old")):
            for case, t in _run(getattr(args, side), args).items():
                best[side][case] = min(t, best[side].get(case, math.inf))
        print(f"round {k + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    cases = sorted(set(best["old"]) & set(best["new"]))
    ratios = {c: best["new"][c] / best["old"][c] for c in cases}
    groups = {"op": [c for c in cases if c.startswith("op/")],
              "model (ReFT)": [c for c in cases if c.startswith("model/") and c.endswith("/reft_kernels")],
              "model (base, control)": [c for c in cases if c.startswith("model/") and c.endswith("/base")]}
    geomean = {g: math.exp(sum(math.log(ratios[c]) for c in cs) / len(cs)) for g, cs in groups.items() if cs}
    for c in cases:
        print(f"{c:<48}{1e3 * best['old'][c]:>10.3f} ms{1e3 * best['new'][c]:>10.3f} ms   new/old {ratios[c]:.3f}"
              "   (CPU time)")
    for g, v in geomean.items():
        print(f"geomean new/old, {g}: {v:.4f}")
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": {"rounds": args.rounds, "repeats": args.repeats, "threads": 1, "clock": "process CPU",
                                "loadavg_before": load_before, "loadavg_after": load_after,
                                "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
                       "min_s": best, "new_over_old": ratios, "geomean": geomean}, f, indent=1)


if __name__ == "__main__":
    main()
