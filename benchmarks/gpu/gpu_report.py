"""Markdown summary of the GPU check's JSON (benchmarks/gpu/gpu_check.py writes both).

    python benchmarks/gpu/gpu_report.py gpu_results/gpu_check.json > summary.md
"""
from __future__ import annotations

import json
import sys


def _fmt(v, spec=".3f"):
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def env_lines(env):
    keys = ["gpu", "capability", "driver", "torch", "torch_cuda", "triton", "transformers", "nvcc",
            "cuda_home", "python", "device", "TRITON_INTERPRET"]
    rows = [(k, env.get(k)) for k in keys if k in env]
    rows += [(f"{name} backend", f"{b['reason']} (first use {b['first_use_s']} s)")
             for name, b in env.get("backends", {}).items()]
    return _table(["what", "found"], rows)


def tests_lines(tests):
    out = [f"**{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
           f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped, "
           f"{tests.get('not_run', 0)} not run (time budget)** "
           f"({_fmt(tests.get('wall_s'), '.0f')} s; pytest exit {tests.get('returncode')})", ""]
    for f in tests.get("failures", [])[:30]:
        out.append(f"- FAILED `{f['test']}`: {f['message'][:200]}")
    return out


def ops_lines(ops):
    rows = []
    for r in ops.get("rows", []):
        rows.append((r["shape"], r["provider"], r.get("fwd_ms"), r.get("fwd_bwd_ms"), r.get("fwd_bwd_hgrad_ms"),
                     _fmt(r.get("fwd_speedup_vs_pyvene"), ".2f"), _fmt(r.get("fwd_bwd_hgrad_speedup_vs_pyvene"), ".2f"),
                     _fmt(r.get("fwd_GBps"), ".0f"), _fmt(r.get("fwd_frac_copy"), ".2f"),
                     f"{_fmt(r.get('fwd_kernels'))} / {_fmt(r.get('fwd_bwd_hgrad_kernels'))}"))
    return _table(["shape", "provider", "fwd ms", "fwd+bwd ms", "fwd+bwd+h ms", "fwd x pyvene",
                   "fwd+bwd+h x pyvene", "fwd GB/s", "fwd / copy", "kernels fwd / fwd+bwd+h"], rows)


def model_lines(model):
    rows = []
    for key, res in model.get("results", {}).items():
        base, ours = res["base"]["wall"], res["reft_kernels"]["wall"]
        rows.append((key, 1e3 * base["median_s"], 1e3 * ours["median_s"], f"{ours['overhead_pct']:+.1f}%"))
    meta = model.get("meta", {})
    head = [f"Llama {meta.get('hidden')}x{meta.get('layers')} ({_fmt((meta.get('n_params') or 0) / 1e9, '.2f')}B "
            f"parameters, {meta.get('dtype')}), train batch {meta.get('batch')} x seq {meta.get('seq')}, "
            f"generate prompt {meta.get('prompt')} + {meta.get('new_tokens')} tokens", ""]
    return head + _table(["benchmark/setting/backend", "base ms", "ReFT ms", "overhead"], rows)


def launch_lines(launch):
    rows = [(r["shape"], r["backend"], r.get("eager_ms"), r.get("enqueue_us"), r.get("kernels"),
             r.get("graph_ms"), _fmt(r.get("graph_speedup"), ".1f"), (r.get("graph_error") or r.get("error") or "")[:80])
            for r in launch.get("rows", [])]
    return _table(["shape", "backend", "eager ms", "enqueue us/call", "kernels", "CUDA graph ms", "graph x",
                   "note"], rows)


def markdown(result):
    meta = result.get("meta", {})
    out = [f"# GPU check ({meta.get('mode')}, {meta.get('date')}, {_fmt(meta.get('wall_s'), '.0f')} s)", ""]
    verdict = "PASSED" if not result.get("failures") else "FAILED"
    out += [f"Correctness: **{verdict}**" + ("" if verdict == "PASSED" else ": " + "; ".join(result["failures"])[:600]), ""]
    if meta.get("mode") == "dry-run":
        out += ["Dry run on CPU (tiny shapes, Triton interpreter): the times only show that each entry point "
                "runs; they measure nothing about a GPU.", ""]
    out += ["## Environment", ""] + env_lines(result.get("env", {})) + [""]
    out += ["## Correctness tests", ""] + tests_lines(result.get("tests", {})) + [""]
    sections = (("ops", "Op benchmark (LoReFT r=4; copy = device-to-device copy of the same bytes)", ops_lines),
                ("model", "Model: train step and generate, overhead vs the base model", model_lines),
                ("launch", "Launch-bound decode step: eager vs CUDA graph", launch_lines))
    for key, title, fn in sections:
        part = result.get(key)
        if not part:
            continue
        out += [f"## {title}", ""] + fn(part) + [""]
        out += [f"- error: {e}" for e in part.get("errors", [])[:20]] + [""]
    if result.get("bench_errors"):
        out += ["## Benchmark errors", ""] + [f"- {e}" for e in result["bench_errors"][:40]] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
