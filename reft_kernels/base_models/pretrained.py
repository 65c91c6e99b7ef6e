"""Loading a causal LM and its tokenizer from ``--model`` (a local directory, a hub name when
online, or a real-model name such as ``smollm2-135m-instruct``), shared by the CLI, the server and
the examples. Errors are ``ValueError`` with a one-line message; callers add their own prefix."""
from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["resolve_model", "load_pretrained", "load_causal_lm", "context_length"]


def resolve_model(name: str) -> str:
    """A local directory or hub name as given; a known real-model name that is not a local path
    becomes its cached directory, fetched and converted on first use (``reft-kernels fetch-model``)."""
    from .real import REAL_MODELS, ModelUnavailable, fetch_model
    if name in REAL_MODELS and not os.path.exists(name):
        try:
            return fetch_model(name, log=lambda msg: print(msg, file=sys.stderr))
        except ModelUnavailable as exc:
            raise ValueError(f"--model {name!r}: {exc}") from None
    return name


def load_pretrained(auto_cls, name: str, dtype):
    """``auto_cls.from_pretrained(name)`` in ``dtype`` (``dtype=`` since transformers 4.56, else ``torch_dtype=``)."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return auto_cls.from_pretrained(name, **{key: dtype})


def load_causal_lm(name: str, dtype=None):
    """(model in eval mode, tokenizer with a pad token, resolved path) for ``--model name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = load_pretrained(AutoModelForCausalLM, path, dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model {name!r} could not be loaded ({first}); pass a local directory with "
                         "config.json, weights and tokenizer files, or a hub name when online") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return model.eval(), tok, path


def context_length(model, tokenizer) -> Optional[int]:
    """The longest input the model and tokenizer both accept (None when neither says)."""
    n = getattr(model.config, "max_position_embeddings", None)
    m = getattr(tokenizer, "model_max_length", None)
    vals = [v for v in (n, m) if isinstance(v, int) and v < 10**8]
    return min(vals) if vals else None
