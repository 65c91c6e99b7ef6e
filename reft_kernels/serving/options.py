"""The HTTP layer's security and limits (no heavy imports: ``reft-kernels serve --help`` reads it).

The flags that set them are defined in :mod:`.server`; :class:`~.guard.Guard` and :mod:`.app`
enforce them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ServeOptions", "MAX_BODY_BYTES", "API_KEY_ENV_VARS"]

MAX_BODY_BYTES = 8 * 1024 * 1024
API_KEY_ENV_VARS = ("REFT_KERNELS_API_KEY", "VLLM_API_KEY")


@dataclass
class ServeOptions:
    """Security and limits of the HTTP layer (``reft-kernels serve`` flags of the same names)."""

    api_key: Optional[str] = None              # every route but /health needs "Authorization: Bearer KEY"
    debug: bool = False                        # /debug/stats, and server paths in /v1/models
    max_prompts_per_request: int = 16
    max_tokens_per_request: int = 65536        # sum over prompts of prompt tokens + max_tokens
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_adapter_dir: Optional[str] = None  # runtime loads only below this directory (symlinks resolved)
