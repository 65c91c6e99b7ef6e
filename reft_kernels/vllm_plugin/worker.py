"""Runtime adapter load/unload in every vLLM worker, through vLLM's public ``worker_extension_cls``.

Start vLLM with ``worker_extension_cls=REFT_WORKER_EXTENSION``; then
``engine.collective_rpc("reft_load_adapter", args=(name, path, positions))`` loads an adapter in
every worker (each tensor-parallel rank holds the full, small adapter stack) and
``collective_rpc("reft_unload_adapter", args=(name,))`` removes it. A failed load raises in the
caller and changes nothing in the worker that failed.
"""
from __future__ import annotations

from typing import List, Optional

__all__ = ["ReftWorkerExtension", "REFT_WORKER_EXTENSION"]

REFT_WORKER_EXTENSION = "reft_kernels.vllm_plugin.worker.ReftWorkerExtension"


def _store():
    from .model import get_store
    store = get_store()
    if store is None:
        raise RuntimeError("this vLLM worker runs no reft_kernels model class: the architecture is not one the "
                           "plugin wraps, or the plugin was not loaded (VLLM_PLUGINS excludes 'reft_kernels'?)")
    return store


class ReftWorkerExtension:
    """Methods vLLM mixes into its worker class (called by name through ``collective_rpc``)."""

    def reft_load_adapter(self, name: str, path: str, positions: Optional[str] = None,
                          share_weights: Optional[bool] = None) -> str:
        from .batch_state import require
        require()      # without the batch state no request could select it: refuse now, not mid-step
        _store().load(name, path, positions, share_weights)
        return name

    def reft_unload_adapter(self, name: str) -> str:
        _store().unload(name)
        return name

    def reft_adapters(self) -> List[str]:
        return sorted(_store().adapters)
