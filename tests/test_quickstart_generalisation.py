"""The default LoReFT's held-out behaviour on the real model stays pyreft's (issue 20).

A loss-only check cannot catch what issue 20 found: the compact completion reached a *lower*
training loss than pyreft's but carried the emoji style to fewer unseen questions. This test runs
pyreft's README quick start (``benchmarks/bench_quickstart_generalisation.py``, whose doc has the
recipe: SmolLM2-135M-Instruct, one LoReFT rank 4 at layer 15, last prompt position, 10 examples,
100 epochs, lr 4e-3, fp32) with the package's *default* intervention at seeds 42 and 43, one
process per seed, one thread each (deterministic: fixed seed, fp32, one intra-op thread, greedy
decoding), and counts the unseen questions (10 per seed) answered in emojis only.

Threshold (sum over the two seeds >= 5), from the measured per-seed table
(benchmarks/results/quickstart_generalisation.md, seeds 42-46):

* pyreft 0.1.0 itself: 3 and 2 at seeds 42 and 43 (sum 5); over 5 seeds 3.4 +- 1.7 per seed;
* ours, ``completion="pyreft"`` (the default since issue 20): 4 and 3 (sum 7);
* ours, ``completion="compact"`` (the default before): 1 and 2 (sum 3);
* ours, ``completion="hartley"``: 2 and 3 (sum 5).

The bound is pyreft's own sum at these seeds (5). It is also pyreft's expected two-seed sum less
one seed-SD of that sum: 2 x 3.4 - 1.7 x sqrt(2) = 4.4, i.e. >= 5 in whole answers. A default
whose held-out behaviour falls more than the measured seed noise below pyreft's fails it. Run
through this test's command on the code of the change (one thread per seed, fp32): the default
gave 4 + 3 = 7 (losses 0.8705, 0.5602) and ``completion="compact"``, the default this test would
have caught, gave 1 + 2 = 3 (losses 0.7230, 0.6144, equal to the table's) and fails. Hartley
passes at these seeds: its deficit (-1.4 paired over 5 seeds) is inside this two-seed test's
resolution.

Cost: two processes of ~6 min each on one thread (in parallel on CI's two cores). Marked
``real_model`` (so ``slow``): CI runs it; the fast run leaves it out.
"""
import json
import os
import subprocess
import sys

import pytest

from reft_kernels.interventions.completions import DEFAULT_COMPLETION
from reft_kernels.base_models import real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_quickstart_generalisation.py")
SEEDS = (42, 43)
MIN_EMOJI_ONLY_SUM = 5      # pyreft 0.1.0's own sum at seeds 42 + 43 (see the module doc)
TIMEOUT_S = 1140            # ~6 min each alone; slack for a loaded machine, under the test's 1200 s


@pytest.fixture(scope="module")
def real_model_dir():
    from test_real_model import _real_dir
    return _real_dir(real.DEFAULT_REAL_MODEL)


@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_default_carries_the_style_to_unseen_prompts_like_pyreft(real_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    procs = {seed: subprocess.Popen(
        [sys.executable, BENCH, "--config", "default", "--seed", str(seed), "--threads", "1",
         "--model-dir", real_model_dir, "--out", str(tmp_path / f"seed{seed}.jsonl")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in SEEDS}
    rows, logs = {}, {}
    try:
        for seed, proc in procs.items():
            logs[seed] = proc.communicate(timeout=TIMEOUT_S)[0]
            assert proc.returncode == 0, f"seed {seed} failed:\n{logs[seed][-3000:]}"
            rows[seed] = json.loads(open(tmp_path / f"seed{seed}.jsonl").readline())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(r["completion"] == DEFAULT_COMPLETION for r in rows.values())
    got = sum(r["emoji_only_unseen"] for r in rows.values())
    detail = {s: (r["emoji_only_unseen"], round(r["final_loss"], 4), r["unseen_answers"]) for s, r in rows.items()}
    assert got >= MIN_EMOJI_ONLY_SUM, (
        f"the default ({DEFAULT_COMPLETION!r}) answers {got} of {10 * len(SEEDS)} unseen questions in "
        f"emojis only at seeds {SEEDS}; pyreft's own recipe gives {MIN_EMOJI_ONLY_SUM}: {detail}")
