"""Pieces of the GPU check (benchmarks/gpu_*.py) that can be checked without a GPU, in seconds.

The whole script runs in CI as ``bash benchmarks/gpu_check.sh --dry-run``; these cover what that
run cannot reach on CPU: the CUDA_HOME assembled from NVIDIA's pip wheels (the native CUDA
backend's compiler on a machine with only the package index), the wheel specs, the JUnit
parsing and the exit status rules.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu"))
import gpu_check  # noqa: E402
import gpu_env  # noqa: E402
from gpu_report import markdown  # noqa: E402


def _touch(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("layout", ["cu12", "cu13"])
def test_cuda_home_assembled_from_wheel_layouts(tmp_path, layout):
    nvidia = tmp_path / "site" / "nvidia"
    if layout == "cu12":   # one folder per component
        nvcc = _touch(nvidia / "cuda_nvcc" / "bin" / "nvcc", "#!/bin/sh\n")
        _touch(nvidia / "cuda_nvcc" / "nvvm" / "bin" / "cicc")
        _touch(nvidia / "cuda_runtime" / "include" / "cuda_runtime.h")
        _touch(nvidia / "cuda_runtime" / "lib" / "libcudart.so.12")
        _touch(nvidia / "cuda_cccl" / "include" / "cuda" / "std" / "tuple")
    else:                  # CUDA 13: every component in nvidia/cu13
        nvcc = _touch(nvidia / "cu13" / "bin" / "nvcc", "#!/bin/sh\n")
        _touch(nvidia / "cu13" / "nvvm" / "bin" / "cicc")
        _touch(nvidia / "cu13" / "include" / "cuda_runtime.h")
        _touch(nvidia / "cu13" / "lib" / "libcudart.so.13")
    nvcc.chmod(0o755)
    home = gpu_env.assemble_cuda_home([nvidia], tmp_path / "home")
    assert home == str(tmp_path / "home")
    for rel in ("bin/nvcc", "nvvm/bin/cicc", "include/cuda_runtime.h", "lib64/libcudart.so"):
        assert (tmp_path / "home" / rel).exists(), rel
    assert os.path.realpath(tmp_path / "home" / "bin" / "nvcc") == str(nvcc.resolve())
    if layout == "cu12":
        assert (tmp_path / "home" / "include" / "cuda" / "std" / "tuple").exists()
    assert gpu_env.assemble_cuda_home([tmp_path / "empty"], tmp_path / "none") is None


def test_nvcc_wheel_specs_follow_torch_cuda_version():
    assert gpu_env.nvcc_wheels("12.8") == ["nvidia-cuda-nvcc-cu12==12.8.*", "nvidia-cuda-runtime-cu12==12.8.*",
                                           "nvidia-cuda-cccl-cu12==12.8.*"]
    # CUDA 13: nvvm and crt pinned too (unpinned, pip takes a newer cicc than the ptxas)
    assert gpu_env.nvcc_wheels("13.0") == ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-runtime==13.0.*",
                                           "nvidia-cuda-cccl==13.0.*", "nvidia-nvvm==13.0.*",
                                           "nvidia-cuda-crt==13.0.*"]
    with pytest.raises(ValueError, match="CUDA 11.8"):
        gpu_env.nvcc_wheels("11.8")


def test_junit_parsing_counts_and_names_failures(tmp_path):
    xml = _touch(tmp_path / "p.xml", """<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.test_a" name="test_skip"><skipped message="needs a GPU"/></testcase>
      <testcase classname="tests.test_b" name="test_err"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>""")
    got = gpu_check.parse_junit(str(xml))
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 1, 1)
    assert [f["test"] for f in got["failures"]] == ["tests.test_a::test_bad", "tests.test_b::test_err"]
    missing = gpu_check.parse_junit(str(tmp_path / "absent.xml"))
    assert missing["failures"] and missing["passed"] == 0


def test_selection_has_the_cuda_tests_and_the_multi_adapter_hook(tmp_path, monkeypatch):
    full, quick = gpu_check.test_selection("full"), gpu_check.test_selection("quick")
    assert "tests/test_ops.py::test_variants_match_oracle_on_cuda" in quick
    assert "tests/test_gpu_model.py" in quick and "tests/test_triton_backend.py" in full
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in full:
        assert os.path.exists(os.path.join(root, f.split("::")[0])), f
    _touch(tmp_path / "tests" / "test_rowop.py")
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    assert "tests/test_rowop.py" in gpu_check.test_selection("quick")


def test_markdown_names_failures_and_renders_every_section():
    result = {"meta": {"mode": "full", "wall_s": 12.0}, "env": {"gpu": "NVIDIA H100", "torch": "2.13.0"},
              "tests": {"passed": 3, "failed": 1, "failures": [{"test": "t::x", "message": "boom"}]},
              "ops": {"rows": [{"shape": "s", "provider": "triton", "fwd_ms": 0.01, "fwd_frac_copy": 0.5}],
                      "errors": []},
              "model": {"meta": {"hidden": 64}, "results": {"train/one/triton": {
                  "base": {"wall": {"median_s": 0.1}}, "reft_kernels": {"wall": {"median_s": 0.11, "overhead_pct": 10.0}}}}},
              "launch": {"rows": [{"shape": "decode", "backend": "native", "eager_ms": 0.02, "graph_error": "X"}]},
              "failures": ["tests: 1 failed"], "bench_errors": []}
    md = markdown(result)
    assert "**FAILED**" in md and "t::x" in md and "NVIDIA H100" in md
    assert "| s | triton | 0.010 |" in md and "+10.0%" in md and "| decode | native |" in md


def test_nvcc_of_another_major_than_torch_is_replaced_by_matching_wheels(tmp_path, monkeypatch):
    """torch.utils.cpp_extension refuses an nvcc whose major version differs from torch's CUDA."""
    import torch

    def fake_toolkit(root, release):
        nvcc = _touch(root / "bin" / "nvcc", f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
        nvcc.chmod(0o755)
        _touch(root / "include" / "cuda_runtime.h")
        return root

    system = fake_toolkit(tmp_path / "system", "13.0")
    wheel = fake_toolkit(tmp_path / "site" / "nvidia" / "cuda_nvcc", "12.8")
    monkeypatch.setenv("CUDA_HOME", str(system))
    monkeypatch.setattr(gpu_env, "nvidia_site_dirs", lambda: [wheel.parent])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gpu_env.ensure_cuda_home(dest=tmp_path / "a", install=False)[0] == str(system)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    home, note = gpu_env.ensure_cuda_home(dest=tmp_path / "b", install=False)
    assert home == str(tmp_path / "b") and "does not match torch's CUDA 12.8" in note
    assert gpu_env.nvcc_release(home) == "12.8"
    monkeypatch.setattr(torch.version, "cuda", "11.8")   # neither matches: no CUDA_HOME, no install
    assert gpu_env.ensure_cuda_home(dest=tmp_path / "c", install=False)[0] is None


def test_tests_past_the_budget_are_skipped_and_counted_as_not_run(tmp_path):
    """The budget plugin skips every test once the deadline has passed; the JUnit parse counts them."""
    import subprocess
    test = _touch(tmp_path / "test_two.py", "def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    xml = tmp_path / "out.xml"
    env = dict(os.environ, REFT_GPU_CHECK_DEADLINE="0", PYTHONPATH=os.path.dirname(gpu_check.__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider",
                           "-p", "gpu_pytest_budget", f"--junitxml={xml}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    got = gpu_check.parse_junit(str(xml))
    assert (got["not_run"], got["passed"], got["skipped"]) == (2, 0, 0)
