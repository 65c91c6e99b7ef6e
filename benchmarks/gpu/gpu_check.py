"""The GPU check: environment, correctness tests, benchmarks; results under one folder.

Run through ``benchmarks/gpu_check.sh`` (which installs what is needed first). Steps:

1. environment: GPU, driver, torch, triton, CUDA, nvcc; builds the native CUDA backend once
   (the tests and benchmarks then load the cached build);
2. correctness: pytest over the CUDA tests (tests/test_ops.py's oracle tests on CUDA,
   tests/test_triton_backend.py, tests/test_gpu_model.py, the native CUDA compile check);
   every backend (triton, native, torch) must be available on the GPU;
3. benchmarks, each in its own process (a CUDA fault in one cannot take the others down) and
   within a time budget: gpu_bench_ops.py, gpu_bench_model.py, gpu_launch.py;
4. ``OUT/gpu_check.json`` (everything), ``OUT/gpu_check.md`` (tables), the pytest and section
   JSON files; the shell wrapper adds ``OUT/gpu_check.log``.

Exit status: 0 all passed; 1 a correctness test failed (or a backend is missing on the GPU);
2 only benchmarks had errors; 3 no usable GPU (``torch.cuda.is_available()`` is False).

``--dry-run`` runs the same steps on CPU: tiny shapes, the Triton interpreter, the GPU tests of
tests/test_gpu_model.py on CPU (``REFT_GPU_CHECK_ON_CPU=1``), no install, so CI proves the
script works before a GPU is available.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_pytest_budget import BUDGET_REASON  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(HERE))   # the repository (HERE: benchmarks/gpu)

CUDA_TESTS = ["tests/test_ops.py::test_variants_match_oracle_on_cuda", "tests/test_gpu_model.py"]
FULL_ONLY_TESTS = ["tests/test_triton_backend.py", "tests/test_native_build.py"]
# HOOK: the per-row multi-adapter op (reft_kernels.ops.reft_edit_multi, tests/test_rowop.py on
# the branch that adds it). Its test files join the selection as soon as they exist in the
# checkout; their CUDA-parametrised tests then run on the GPU.
MULTI_ADAPTER_TESTS = ["tests/test_rowop.py", "tests/test_*multi*.py", "tests/test_*per_row*.py"]
# the dry run: the same files, but few tests of the interpreted-triton file (minutes on CPU), not
# the nvcc compile check and not the multi-adapter tests (the main suite runs both)
DRY_RUN_K = ("not (test_triton_backend or test_native_build or test_rowop or multi or per_row) or "
             "(test_variants_match_torch_backend and loreft and fp32)")

# Time budgets in seconds, after the environment step (install, one-time native CUDA build):
# per step (cap, floor) and in all. A step gets its cap, less whatever would eat into the later
# steps' floors; past its budget a step starts nothing new (tests left are skipped, counted).
BUDGETS = {
    "full": dict(total=420, tests=(240, 150), ops=(100, 40), model=(60, 25), launch=(20, 8)),
    "quick": dict(total=170, tests=(100, 60), ops=(35, 15), model=(25, 10), launch=(10, 5)),
    "dry-run": dict(total=3000, tests=(900, 900), ops=(600, 600), model=(600, 600), launch=(300, 300)),
}
STEPS = ("tests", "ops", "model", "launch")


def step_budget(mode, step, deadline):
    """Seconds for ``step``: its cap, within what the overall deadline leaves after later floors."""
    b = BUDGETS[mode]
    later = sum(b[s][1] for s in STEPS[STEPS.index(step) + 1:])
    return max(b[step][1] if step == "tests" else 5.0, min(b[step][0], deadline - time.time() - later))


def test_selection(mode):
    files = list(CUDA_TESTS)
    if mode != "quick":
        files += FULL_ONLY_TESTS
    for pattern in MULTI_ADAPTER_TESTS:
        files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return list(dict.fromkeys(files))


def run_tests(mode, out, timeout):
    """pytest over the selection; counts and failures from its JUnit XML."""
    xml = os.path.join(out, "pytest.xml")
    cmd = [sys.executable, "-m", "pytest", *test_selection(mode), "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "gpu_pytest_budget", f"--junitxml={xml}"]
    # past the budget the remaining tests are skipped (and counted as not run); the hard timeout
    # below only guards against a hang
    env = dict(os.environ, REFT_GPU_CHECK_DEADLINE=str(time.time() + timeout),
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    if mode == "dry-run":
        cmd += ["-k", DRY_RUN_K]
        env.update(REFT_GPU_CHECK_ON_CPU="1", TRITON_INTERPRET="1")
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout + 300).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    result = dict(command=cmd, returncode=rc, wall_s=time.time() - start, **parse_junit(xml))
    if rc == "timeout":
        result["failures"].append(dict(test="pytest", message=f"timed out after {timeout} s"))
    return result


def parse_junit(path):
    counts = dict(passed=0, failed=0, errors=0, skipped=0, not_run=0, failures=[])
    if not os.path.exists(path):
        counts["failures"].append(dict(test="pytest", message="no JUnit XML written (pytest crashed?)"))
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["not_run" if BUDGET_REASON in (outcome.get("message") or "") else "skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            counts["failures"].append(dict(test=name, message=(outcome.get("message") or "")[:500]))
    return counts


def run_section(script, out, mode, budget):
    """One benchmark in its own process; its JSON (or why there is none)."""
    path = os.path.join(out, script.replace("gpu_", "").replace("bench_", "").replace(".py", ".json"))
    flag = {"quick": ["--quick"], "dry-run": ["--tiny"]}.get(mode, [])
    cmd = [sys.executable, os.path.join(HERE, script), "--json", path, "--budget-s", str(budget), *flag]
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if mode == "dry-run" else {}))
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=budget + 240).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    result = {"errors": []}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    elif rc == 0:
        rc = "no output"
    if rc not in (0, 1):   # 1: the section ran and listed its errors
        result["errors"].append(f"{script} exited with {rc}")
    result.update(returncode=rc, wall_s=time.time() - start)
    return result


def environment(mode):
    """Report dict, and failures that make the run pointless or incomplete."""
    import torch

    sys.path.insert(0, ROOT)
    from gpu_env import report
    from reft_kernels.ops.autograd import get_backend_safely

    cuda = torch.cuda.is_available() and mode != "dry-run"
    device = torch.device("cuda" if cuda else "cpu")
    env, failures = report(device), []
    if mode != "dry-run" and not cuda:
        failures.append(f"no usable GPU: torch.cuda.is_available() is False (torch {torch.__version__}, built for "
                        f"CUDA {torch.version.cuda}); a CPU torch build or a driver problem")
        return env, failures, device
    env["backends"] = {}
    # the tests also build the native CPU extension (tests/test_ops.py lists CPU backends on
    # import): build it now, in parallel with the CUDA one
    cpu_build = subprocess.Popen([sys.executable, "-c", "import torch; from reft_kernels.ops import native_backend "
                                  "as nb; nb.is_available(torch.device('cpu'))"], cwd=ROOT) if cuda else None
    for name in ("triton", "native"):
        start = time.time()
        mod = get_backend_safely(name)
        ok = mod is not None and mod.is_available(device)
        reason = "available" if ok else (mod.unavailable_reason(device) if mod else "cannot be imported")
        env["backends"][name] = dict(available=ok, reason=reason, first_use_s=round(time.time() - start, 1))
        print(f"backend {name} on {device}: {reason} ({env['backends'][name]['first_use_s']} s)", flush=True)
        if not ok and cuda:
            failures.append(f"the {name} backend is unavailable on the GPU: {reason}")
    if cpu_build is not None:
        cpu_build.wait()
    return env, failures, device


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_results")
    ap.add_argument("--quick", action="store_true", help="fewer tests, shapes and repeats (< 3 min)")
    ap.add_argument("--dry-run", action="store_true", help="on CPU, tiny: proves the script works")
    ap.add_argument("--skip-bench", action="store_true", help="correctness tests only")
    args = ap.parse_args(argv)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    if mode == "dry-run":
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    start = time.time()
    result = dict(meta=dict(mode=mode, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), out=out, steps_s={}))

    print(f"== GPU check ({mode}) -> {out}", flush=True)
    result["env"], failures, device = environment(mode)
    result["meta"]["steps_s"]["environment"] = time.time() - start
    for key in ("gpu", "driver", "torch", "torch_cuda", "triton", "nvcc"):
        print(f"  {key:<11} {result['env'].get(key)}", flush=True)
    bench_errors = []
    deadline = time.time() + BUDGETS[mode]["total"]
    budget = {}
    if not failures or mode == "dry-run":
        print("\n== correctness tests", flush=True)
        budget["tests"] = step_budget(mode, "tests", deadline)
        result["tests"] = run_tests(mode, out, budget["tests"])
        result["meta"]["steps_s"]["tests"] = result["tests"]["wall_s"]
        t = result["tests"]
        if t["failed"] or t["errors"] or t["returncode"] not in (0, 5) or not t["passed"]:
            failures.append(f"tests: {t['failed']} failed, {t['errors']} errors, {t['passed']} passed "
                            f"(pytest exit {t['returncode']})")
        if t["not_run"] and mode != "quick":   # --quick is a partial check by design: reported only
            failures.append(f"tests: {t['not_run']} not run, the time budget of {budget['tests']:.0f} s was spent")
        if not args.skip_bench:
            for key, script in (("ops", "gpu_bench_ops.py"), ("model", "gpu_bench_model.py"),
                                ("launch", "gpu_launch.py")):
                print(f"\n== benchmark: {key}", flush=True)
                budget[key] = step_budget(mode, key, deadline)
                result[key] = run_section(script, out, mode, budget[key])
                result["meta"]["steps_s"][key] = result[key]["wall_s"]
                bench_errors += [f"{key}: {e}" for e in result[key].get("errors", [])
                                 if "time budget" not in e]
    result["meta"]["budgets_s"] = budget
    result.update(failures=failures, bench_errors=bench_errors)
    code = 3 if any(f.startswith("no usable GPU") for f in failures) else 1 if failures else 2 if bench_errors else 0
    result["meta"].update(wall_s=time.time() - start, exit_code=code)
    write(result, out)
    print(f"\n== {'PASSED' if code == 0 else 'FAILED' if code in (1, 3) else 'PASSED with benchmark errors'}"
          f" (exit {code}, {result['meta']['wall_s']:.0f} s); results in {out}", flush=True)
    for f in failures + bench_errors:
        print(f"  - {f}", flush=True)
    return code


def write(result, out):
    from gpu_report import markdown

    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(result) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
