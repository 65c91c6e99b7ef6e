"""Which adapter names this process can vouch for, so a request naming another one is refused.

vLLM checks each request in its front end (the process that admits requests:
``vllm serve``'s API server, ``LLM``, ``LLMEngine``) with the logits processor's public
``validate_params(sampling_params)`` before it reaches any worker; a ``ValueError`` there is
answered 400 over HTTP (an exception offline), and the engine never sees the request. The hook
gets only the request, so the front end must know the loaded adapters from somewhere else:

* ``vllm serve``: the plugin's endpoint part (:mod:`.endpoint`, a ``vllm.endpoint_plugins`` entry
  point, loaded when ``VLLM_PLUGINS`` names ``reft_kernels``) reads ``--hf-overrides``'
  ``reft_adapters`` from the engine's config at start and publishes them here;
* ``reft-kernels serve --engine vllm`` (:class:`reft_kernels.serving.vllm_engine.VllmEngine`)
  publishes its adapters on every load and unload;
* ``LLM(...)``: :func:`publish` (``publish(llm)`` reads the same config); an engine whose worker
  runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is read directly (:data:`local_store`).

When none of these applies, :func:`known` is None and the check refuses every adapter request
(it cannot tell a loaded name from a typo, and a typo must never be answered by the base model).
"""
from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["publish", "known", "configured_names", "ADAPTERS_CONFIG_KEY", "ADAPTER_KEY", "GENERATED_KEY"]

ADAPTERS_CONFIG_KEY = "reft_adapters"     # hf_overrides={"reft_adapters": {name: path | {path, positions}}}
ADAPTER_KEY = "reft_adapter"              # per request: extra_args / vllm_xargs {"reft_adapter": NAME}
GENERATED_KEY = "reft_generated_positions"   # decode-time edits: "all", k (every k-th), [j, ...]
_published: Optional[frozenset] = None
local_store = None                       # the AdapterStore of a worker in this process (set by .model)


def configured_names(vllm_config) -> list:
    """The adapter names ``hf_overrides={"reft_adapters": {...}}`` configures in ``vllm_config``."""
    spec = getattr(vllm_config.model_config.hf_config, ADAPTERS_CONFIG_KEY, None) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"hf_overrides[{ADAPTERS_CONFIG_KEY!r}] must map adapter names to checkpoint paths "
                         f"(or {{'path': ..., 'positions': 'l1'}}), got {type(spec).__name__}")
    return sorted(spec)


def publish(source) -> frozenset:
    """Declare the adapters this front end's engine serves: names, a ``VllmConfig``, or an ``LLM``."""
    global _published
    engine = getattr(source, "llm_engine", source)           # LLM -> LLMEngine
    config = getattr(engine, "vllm_config", source)
    names = configured_names(config) if hasattr(config, "model_config") else list(source)
    _published = frozenset(names)
    return _published


def known() -> Optional[frozenset]:
    """The adapter names requests may select here, or None when this process cannot know them."""
    if _published is not None:
        return _published
    if local_store is not None:
        return frozenset(local_store.adapters)
    return None


def describe(names: Optional[Iterable[str]]) -> str:
    return ", ".join(repr(n) for n in sorted(names)) if names else "none"
