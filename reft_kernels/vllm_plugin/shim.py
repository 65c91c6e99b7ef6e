"""The one place the plugin reads vLLM internals: how many tokens each request has in this step.

vLLM's model ``forward`` gets every scheduled token flattened into one sequence, ordered by the
request's index in the persistent batch (the index a logits processor's ``update_state`` sees),
with each token's absolute ``positions``. What it does not get is where one request's tokens end
and the next one's begin. That is the attention metadata's ``query_start_loc`` (``num_reqs + 1``
offsets), read here from the forward context. Everything else the plugin uses is public (model
registry, general plugins, logits processors, ``SamplingParams.extra_args``, ``cache_salt``).

The layout read here is checked for the vLLM versions in :data:`SUPPORTED`; any other version
raises :class:`UnsupportedVllmError` naming the supported range, never a silent wrong answer.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SUPPORTED", "UnsupportedVllmError", "check_vllm_version", "query_start_loc"]

SUPPORTED = ((0, 32), (0, 33))      # [lower, upper) on (major, minor)
SUPPORTED_TEXT = ">=0.32,<0.33"


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range the plugin was written and tested for."""


def _version_tuple(text: str):
    parts = []
    for p in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_vllm_version(version: Optional[str] = None) -> str:
    """The installed vLLM version; raises UnsupportedVllmError outside :data:`SUPPORTED`."""
    if version is None:
        import vllm
        version = vllm.__version__
    lo, hi = SUPPORTED
    if not lo <= _version_tuple(version) < hi:
        raise UnsupportedVllmError(
            f"reft_kernels' vLLM plugin supports vLLM {SUPPORTED_TEXT}, found vLLM {version}; install "
            "a supported vLLM (pip install -e \".[vllm]\") or update reft_kernels")
    return version


def query_start_loc() -> Optional[torch.Tensor]:
    """This step's per-request token offsets (``num_reqs + 1``, int64, CPU), or None outside a
    model step with attention metadata (profiling and warm-up runs)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return None
    if isinstance(metadata, list):
        raise UnsupportedVllmError("reft_kernels' vLLM plugin does not support dual-batch overlap (micro-batched "
                                   "attention metadata); run without --enable-dbo")
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
        if metadata is None:
            return None
    loc = getattr(metadata, "query_start_loc", None)
    if not isinstance(loc, torch.Tensor):
        raise UnsupportedVllmError(
            f"reft_kernels' vLLM plugin could not find query_start_loc in {type(metadata).__name__}; the plugin "
            f"supports vLLM {SUPPORTED_TEXT} with its standard attention backends")
    return loc.to("cpu", torch.int64)
