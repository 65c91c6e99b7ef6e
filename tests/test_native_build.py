"""Compile check of the CUDA kernels (csrc/reft_cuda.cu) without a GPU: build breaks show up in CI.

reft_cuda.cu is torch-free apart from c10's BFloat16/Half value types, so nvcc compiles it for
sm_80 and sm_90 in ~15 s. The torch binding (reft_cuda_binding.cpp) is host C++ and is only built
on a CUDA machine, by reft_kernels.ops.native_backend.
"""
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

from reft_kernels.ops.native_backend import CSRC

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", f"-I{CSRC}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(CSRC / "reft_cuda.cu"), "-o", str(tmp_path / "reft_cuda.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "reft_cuda.o").stat().st_size > 0
