"""Which dtype the frozen base model runs in: ``--dtype {auto,float32,bfloat16}``.

bf16 halves the bytes every base matmul reads, and on CPUs with AVX512-BF16 or AMX-BF16 oneDNN
runs bf16 GEMMs natively (``benchmarks/bench_bf16_prefix.py`` times one and the whole model;
``ONEDNN_VERBOSE=1`` names the ``avx512_core_amx_bf16`` / ``avx512_core_bf16`` kernel it picks).
Without those instructions bf16 is emulated and slower than fp32, so ``auto`` picks:

* CUDA: bf16 when the GPU supports it (``torch.cuda.is_bf16_supported()``), else fp32;
* CPU: bf16 when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16``, else fp32 with a
  one-line message saying why.

Only the base model changes dtype. The intervention parameters and the optimizer state stay fp32
(the op computes in fp32 on the selected rows and writes the edited rows back in the base dtype:
:func:`reft_kernels.ops.family.compute_dtype`).
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["DTYPE_CHOICES", "BF16_CPU_FLAGS", "cpu_bf16_flags", "resolve_dtype", "dtype_help"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple:
    """The native-bf16 instruction flags this CPU lists (empty when none, or no /proc/cpuinfo)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def resolve_dtype(name: str = "auto", device: str = "cpu", log: Optional[Callable[[str], None]] = print,
                  cpuinfo: str = "/proc/cpuinfo"):
    """``"auto" | "float32" | "bfloat16"`` (or a torch dtype) -> the torch dtype of the base model.

    ``auto`` follows the module docstring and ``log``s one line when it falls back to fp32.
    """
    import torch
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}; use auto "
                         "(bfloat16 where the hardware runs it natively) or float32 (exact)")
    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        reason = "this GPU has no bf16"
    elif cpu_bf16_flags(cpuinfo):
        return torch.bfloat16
    else:
        reason = f"this CPU lists none of {'/'.join(BF16_CPU_FLAGS)} (bf16 would be emulated, slower)"
    if log is not None:
        log(f"--dtype auto: float32, {reason}; pass --dtype bfloat16 to force it")
    return torch.float32


def dtype_help(what: str = "the base model") -> str:
    return (f"dtype of {what}: auto = bfloat16 where the CPU has AVX512-BF16/AMX (or the GPU has bf16), "
            "else float32; the adapter and optimizer stay float32")
