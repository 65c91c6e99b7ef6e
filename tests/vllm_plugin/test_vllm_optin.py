"""Opt-in vLLM checks (REFT_VLLM_FULL=1; not in CI: each starts extra engines, minutes on CPU):

* tensor parallelism: TP=2 (two CPU workers, gloo) answers exactly as TP=1, adapters mixed;
* a compiled engine (torch.compile) refuses adapters with a clear error instead of running a
  graph that froze the edit path.
"""
import os

import pytest

from fixtures import build_adapters, build_tiny, hf_reference, prompts_for, run_vllm

pytestmark = pytest.mark.skipif(os.environ.get("REFT_VLLM_FULL") != "1",
                                reason="opt-in: REFT_VLLM_FULL=1 bash .ci/vllm_venv.sh --test")
NAMES = [None, "last1", "fl3", "pyr"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer
    root = str(tmp_path_factory.mktemp("vllm_optin"))
    model = build_tiny(root)
    adapters = build_adapters(model, root)
    prompts = prompts_for(AutoTokenizer.from_pretrained(model), 4)
    return model, adapters, [(p, NAMES[i]) for i, p in enumerate(prompts)]


def test_tensor_parallel_2_equals_hf(setup, monkeypatch):
    model, adapters, requests = setup
    # vLLM's CPU backend binds each rank to a NUMA node; a one-node machine binds ranks to cores
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"))
    reference = hf_reference(model, adapters, requests, 6)
    out = run_vllm({"model": model, "adapters": adapters, "max_tokens": 6,
                    "engine": {"tensor_parallel_size": 2, "enable_prefix_caching": False},
                    "batches": [[{"ids": p, "adapter": n} for p, n in requests]]}, timeout=900)["outputs"]
    assert out[0] == reference


def test_compiled_engine_refuses_adapters(setup):
    model, adapters, requests = setup
    with pytest.raises(AssertionError, match="eager mode"):
        run_vllm({"model": model, "adapters": adapters, "max_tokens": 2, "engine": {"enforce_eager": False},
                  "batches": [[{"ids": requests[0][0], "adapter": "last1"}]]}, timeout=900)
