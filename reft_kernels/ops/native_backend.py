"""The ``native`` backend: the family's kernels in C++ (OpenMP) and CUDA, from ``csrc/``.

Implements the launcher contract of :mod:`reft_kernels.ops.autograd` (``forward_rows`` and
``backward_rows``, per-row adapters; one adapter is A = 1). The extensions are compiled on first use with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja; nvcc for CUDA), never at
import time, and cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/reft_kernels``; later runs
load the cached build. ``REFT_KERNELS_VERBOSE_BUILD=1`` shows the compiler output.

Sources (``csrc/`` at the repository root):
  * ``reft_rows.h``: the per-row math shared by both (``__host__ __device__``), Philox dropout RNG;
  * ``reft_binding.h``: the torch-side argument checks and weight conversion both bindings share;
  * ``reft_cpu.cpp``: OpenMP over rows, per-chunk weight-gradient partials per adapter;
  * ``reft_cuda.cu``: torch-free CUDA kernels, ``reft_cuda_binding.cpp``: their torch binding.

Weights may have any float dtype (they are converted to the compute dtype once per call, they
are only r x d); hidden may be fp32, fp64, bf16 or fp16; the math runs in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from .variants import ACT_IDS

__all__ = ["forward_rows", "backward_rows", "is_available", "unavailable_reason", "load_extension", "CSRC"]

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCES = {"cpu": ["reft_cpu.cpp"], "cuda": ["reft_cuda_binding.cpp", "reft_cuda.cu"]}
_HEADERS = {"cpu": ["reft_rows.h", "reft_binding.h"],
            "cuda": ["reft_rows.h", "reft_binding.h", "reft_cuda.h"]}
_lock = threading.Lock()
_modules = {}   # kind -> loaded extension module
_errors = {}    # kind -> reason it is unavailable


def _verbose() -> bool:
    return os.environ.get("REFT_KERNELS_VERBOSE_BUILD", "") not in ("", "0")


def _sources_digest(kind: str) -> str:
    """A short hash of this checkout's sources for ``kind`` (paths and contents): two checkouts or
    two versions of csrc/ never share, and so never rebuild over, one build directory."""
    digest = hashlib.sha256(str(CSRC).encode())
    for source in _SOURCES[kind] + _HEADERS[kind]:
        digest.update(source.encode() + b"\0" + (CSRC / source).read_bytes())
    return digest.hexdigest()[:12]


def _build_dir(name: str, kind: str):
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None  # cpp_extension.load uses $TORCH_EXTENSIONS_DIR/<name>
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}"
    path = Path.home() / ".cache" / "reft_kernels" / tag / f"{name}-{_sources_digest(kind)}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _summarize(err: BaseException) -> str:
    """The first compiler error lines of a failed build (or the exception's last line)."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:] or [type(err).__name__]
    return f"build failed: {' | '.join(lines[:3])[:600]}"


def _missing_tools(kind: str):
    if not CSRC.is_dir():
        return f"csrc/ not found at {CSRC} (the native sources ship with the repository, not the wheel)"
    missing = [s for s in _SOURCES[kind] + _HEADERS[kind] if not (CSRC / s).is_file()]
    if missing:
        return f"missing sources in {CSRC}: {', '.join(missing)}"
    if not shutil.which(os.environ.get("CXX", "c++")):
        return "no compiler (no C++ compiler on PATH; set CXX or install g++)"
    if not shutil.which("ninja"):
        return "no compiler (ninja is not installed; pip install ninja)"
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME
        if not torch.cuda.is_available():
            return "no CUDA device"
        if CUDA_HOME is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return "no compiler (nvcc not found; set CUDA_HOME)"
    return None


def _build(kind: str):
    from torch.utils.cpp_extension import load

    name = f"reft_kernels_native_{kind}"
    cflags = ["-O3", "-fopenmp"]  # torch picks the C++ standard; no -march (portable builds)
    kwargs = dict(
        name=name, sources=[str(CSRC / s) for s in _SOURCES[kind]], extra_include_paths=[str(CSRC)],
        extra_cflags=cflags, extra_ldflags=["-fopenmp"], build_directory=_build_dir(name, kind),
        verbose=_verbose())
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo"]
    with warnings.catch_warnings():
        if not _verbose():
            warnings.simplefilter("ignore")
        with _guarded_build(name, kwargs["build_directory"]):
            return load(**kwargs)


class _guarded_build:
    """One build at a time per build directory, and no wait on a lock a killed build left behind.

    torch's ``load`` serialises builds with a ``lock`` file in the build directory (a baton): a
    build killed midway (Ctrl-C at the wrong moment, a killed job) leaves it there, and every
    later build waits on it forever. Around torch's baton we hold an OS lock (``flock`` on
    ``build.flock``) that the kernel releases when its holder dies, even on SIGKILL. Every
    reft_kernels build of this directory holds it while torch's ``lock`` exists, so a ``lock``
    found while holding it is stale: it is removed, and that is said on stderr.

    Also says on stderr that a first-use compile is running (~1 min) and when it is done; silent
    when the extension is already built (loading it takes well under a second).
    """

    def __init__(self, name, build_directory):
        if build_directory is None:
            from torch.utils.cpp_extension import _get_build_directory
            build_directory = _get_build_directory(name, verbose=False)
        self.dir = Path(build_directory)
        self.name = name
        self._handle = None

    def _lock(self):
        try:
            import fcntl
        except ImportError:    # not POSIX: torch's baton alone
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.dir / "build.flock", "a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"reft_kernels: waiting for another process's build of the native kernels in {self.dir} "
                  "to finish", file=sys.stderr, flush=True)
            fcntl.flock(self._handle, fcntl.LOCK_EX)
        stale = self.dir / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
            print(f"reft_kernels: removed the stale lock file {stale} (left by a native build that was "
                  "stopped midway)", file=sys.stderr, flush=True)

    def __enter__(self):
        import time
        self._lock()
        self.t0 = time.perf_counter()
        self.compiling = not (self.dir / f"{self.name}.so").is_file()
        if self.compiling:
            print(f"reft_kernels: compiling the native C++ kernels, one time only (~1 min); the build is "
                  f"cached in {self.dir}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        import time
        if self._handle is not None:
            self._handle.close()    # releases the flock
        if self.compiling and exc_type is None:
            print(f"reft_kernels: native kernels built in {time.perf_counter() - self.t0:.0f} s",
                  file=sys.stderr, flush=True)
        return False


def load_extension(kind: str):
    """The compiled extension for ``kind`` ("cpu" or "cuda"), building it on first use.

    Raises RuntimeError with :func:`unavailable_reason` when it cannot be built.
    """
    with _lock:
        if kind not in _modules and kind not in _errors:
            reason = _missing_tools(kind)
            if reason is None:
                try:
                    _modules[kind] = _build(kind)
                except Exception as err:  # noqa: BLE001 - any build failure means "unavailable"
                    reason = _summarize(err)
            if reason is not None:
                _errors[kind] = reason
        if kind in _errors:
            raise RuntimeError(f"reft_kernels native {kind} backend unavailable: {_errors[kind]}")
        return _modules[kind]


def _kind(device) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def is_available(device) -> bool:
    """True if the extension for ``device`` builds (tried once per process, result cached)."""
    try:
        load_extension(_kind(device))
        return True
    except RuntimeError:
        return False


def unavailable_reason(device) -> str:
    """Why the backend cannot run on ``device`` (the build error summary or "no compiler")."""
    kind = _kind(device)
    if kind not in _modules and kind not in _errors:
        is_available(device)
    return _errors.get(kind, "available")


# --------------------------------------------------------------------------------------------
# launcher contract (see reft_kernels/ops/autograd.py)
# --------------------------------------------------------------------------------------------
def forward_rows(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``x2d`` (M, d) in place at ``rows`` (entry n with adapter ``adapter[n]``); return saved rows."""
    return load_extension(_kind(x2d.device)).forward_rows(
        x2d, rows, adapter, proj, weight, bias, proj_bias, spec.has_weight, spec.subtract_proj,
        ACT_IDS[act], float(p), int(seed))


def backward_rows(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Overwrite ``grad2d`` with grad_h at ``rows``; return the stacked fp32 (fp64) weight grads."""
    return tuple(load_extension(_kind(grad2d.device)).backward_rows(
        grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec.has_weight,
        spec.subtract_proj, ACT_IDS[act], float(p), int(seed)))
