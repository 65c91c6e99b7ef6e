"""What the GPU check runs on, and a CUDA compiler for the native backend from the package index.

    python benchmarks/gpu/gpu_env.py report          # GPU, driver, torch, triton, CUDA, nvcc as JSON
    python benchmarks/gpu/gpu_env.py ensure-nvcc     # print a CUDA_HOME with bin/nvcc (pip-installs
                                                 # the nvcc wheels matching torch's CUDA if none)

The native CUDA backend compiles ``csrc/`` with ``torch.utils.cpp_extension``, which needs
``$CUDA_HOME/bin/nvcc``, ``$CUDA_HOME/include`` (cuda_runtime.h) and ``$CUDA_HOME/lib64``
(libcudart). A machine with only the package index can get them as NVIDIA's wheels
(``nvidia-cuda-nvcc``, ``nvidia-cuda-runtime``, ``nvidia-cuda-cccl``), which install into
``site-packages/nvidia/<component>/{bin,include,lib}`` (CUDA 12) or ``nvidia/cu13/...`` (CUDA 13);
:func:`assemble_cuda_home` links those trees into one CUDA_HOME-shaped folder.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def find_cuda_home():
    """The first CUDA_HOME candidate with an executable bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:   # may be a wrapper script elsewhere (then the folders above usually hold the toolkit)
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if (home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            return home
    return None


def nvcc_release(home):
    """"13.0" from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88"), or None."""
    match = re.search(r"release (\d+\.\d+)", _run([os.path.join(home, "bin", "nvcc"), "--version"]) or "")
    return match.group(1) if match else None


def nvcc_wheels(cuda_version: str):
    """pip specs of the compiler, runtime headers and CCCL for torch's CUDA ("12.8", "13.0").

    CUDA 13's nvcc wheel depends on nvidia-nvvm and nvidia-cuda-crt without a version: left
    alone, pip takes the newest, whose cicc writes PTX that the older ptxas rejects
    ("Unsupported .version"); they are pinned to the same release.
    """
    major, minor = cuda_version.split(".")[:2]
    if major not in ("12", "13"):
        raise ValueError(f"torch was built for CUDA {cuda_version}; only 12.x and 13.x wheels are known")
    if major == "12":
        return [f"nvidia-cuda-{part}-cu12=={major}.{minor}.*" for part in ("nvcc", "runtime", "cccl")]
    return [f"nvidia-{part}=={major}.{minor}.*"
            for part in ("cuda-nvcc", "cuda-runtime", "cuda-cccl", "nvvm", "cuda-crt")]


def assemble_cuda_home(nvidia_dirs, dest):
    """Link every ``<pkg>/{bin,include,lib,nvvm,...}`` entry found under ``nvidia_dirs`` into ``dest``.

    The first tree to provide a name wins. ``lib`` is also linked as ``lib64``, and an unversioned
    ``libcudart.so`` is added next to ``libcudart.so.N`` (the linker needs ``-lcudart``). Returns
    ``dest`` when ``dest/bin/nvcc`` exists, else None.
    """
    dest = Path(dest)
    for root in nvidia_dirs:
        for pkg in sorted(Path(root).glob("*")):
            if not pkg.is_dir():
                continue
            for sub in sorted(pkg.iterdir()):
                if not sub.is_dir() or sub.name.startswith(("__", ".")):
                    continue
                target_dir = dest / sub.name
                target_dir.mkdir(parents=True, exist_ok=True)
                for entry in sub.iterdir():
                    link = target_dir / entry.name
                    if not link.exists() and not link.is_symlink():
                        link.symlink_to(entry.resolve())
    lib = dest / "lib"
    if lib.is_dir():
        if not (dest / "lib64").exists():
            (dest / "lib64").symlink_to("lib")
        cudart = sorted(lib.glob("libcudart.so.*"))
        if cudart and not (lib / "libcudart.so").exists():
            (lib / "libcudart.so").symlink_to(cudart[0].name)
    return str(dest) if (dest / "bin" / "nvcc").exists() else None


def nvidia_site_dirs():
    """Every ``site-packages/nvidia`` folder on sys.path (where NVIDIA's wheels install)."""
    return [p for p in (Path(s) / "nvidia" for s in sys.path if s) if p.is_dir()]


def ensure_cuda_home(dest=None, install=True, timeout=240):
    """(CUDA_HOME or None, note). Installs the nvcc wheels matching torch's CUDA when none is found."""
    import torch
    home = find_cuda_home()
    if home and not torch.version.cuda:
        return home, f"nvcc found at {home}/bin/nvcc"
    if not torch.version.cuda:
        return None, "torch is a CPU build: no CUDA toolkit to look for"
    note = ""
    if home:   # torch.utils.cpp_extension refuses an nvcc of another major version than torch's
        found = nvcc_release(home)
        if found and found.split(".")[0] == torch.version.cuda.split(".")[0]:
            return home, f"nvcc {found} found at {home}/bin/nvcc"
        note = f"nvcc {found} at {home} does not match torch's CUDA {torch.version.cuda}; "
    dest = Path(dest or Path.home() / ".cache" / "reft_kernels" / f"cuda_home_{torch.version.cuda}")
    home = assemble_cuda_home(nvidia_site_dirs(), dest) if nvidia_site_dirs() else None
    if home and (nvcc_release(home) or "").split(".")[0] != torch.version.cuda.split(".")[0]:
        home = None
    if home or not install:
        return home, note + ("nvcc assembled from installed NVIDIA wheels" if home else "no matching nvcc installed")
    specs = nvcc_wheels(torch.version.cuda)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--retries", "2", "--timeout", "30", *specs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"'{' '.join(cmd)}' took over {timeout} s"
    if proc.returncode:
        return None, f"'{' '.join(cmd)}' failed: {proc.stderr.strip()[-400:]}"
    import site
    import importlib
    importlib.reload(site)
    shutil.rmtree(dest, ignore_errors=True)
    home = assemble_cuda_home(nvidia_site_dirs(), dest)
    return home, f"installed {' '.join(specs)}" + ("" if home else ", but no bin/nvcc among them")


def _run(cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def report(device):
    """A dict describing the machine and the software stack (values None where unknown)."""
    import platform

    import torch
    import transformers
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "transformers": transformers.__version__,
            "device": str(device), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        info["triton"] = f"not importable: {err}"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    if smi:
        info["driver"] = smi.splitlines()[0].split(",")[1].strip()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    home = find_cuda_home()
    info["cuda_home"] = home
    version = _run([os.path.join(home, "bin", "nvcc"), "--version"]) if home else None
    info["nvcc"] = next((ln for ln in version.splitlines() if "release" in ln), version.splitlines()[-1]) if version else None
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ensure-nvcc"]:
        home, note = ensure_cuda_home(install="--no-install" not in argv)
        print(note, file=sys.stderr)
        if home:
            print(home)
        return 0 if home else 1
    import torch
    print(json.dumps(report(torch.device("cuda" if torch.cuda.is_available() else "cpu")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
