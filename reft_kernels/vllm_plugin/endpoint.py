"""The plugin's part in ``vllm serve``'s API server: tell the front end which adapters exist.

A ``vllm.endpoint_plugins`` entry point (vLLM's public hook for the API server process; vLLM loads
it only when ``VLLM_PLUGINS`` names it, e.g. ``VLLM_PLUGINS=reft_kernels``, which also keeps the
general plugin of the same name). At start it reads ``--hf-overrides``' ``reft_adapters`` from
the engine's config, checks that the served architecture is one the plugin wraps, and publishes
the names (:mod:`.known`), so :meth:`ReftBatchState.validate_params` answers a request naming any
other adapter with a 400 instead of letting the base model answer it. It adds no route.
"""
from __future__ import annotations

import logging

__all__ = ["ReftEndpointPlugin"]

log = logging.getLogger("reft_kernels.vllm")


class ReftEndpointPlugin:
    """vLLM's ``EndpointPlugin`` protocol: ``name``, ``required_tasks``, ``attach_router``, ``init_state``."""

    name = "reft_kernels"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:   # no routes of its own
        return None

    async def init_state(self, engine_client, state, args) -> None:
        from . import known
        if engine_client is None:            # vLLM's render-only server: no engine, no requests
            return
        config = engine_client.vllm_config
        names = known.configured_names(config)
        if names:
            from .model import reft_arch_classes
            arch = config.model_config.architecture
            if arch not in reft_arch_classes():
                raise ValueError(f"--hf-overrides configures ReFT adapters {names}, but the served architecture "
                                 f"{arch!r} is not one reft_kernels' vLLM plugin wraps ({sorted(reft_arch_classes())})")
        known.publish(names)
        log.info("reft_kernels: requests may select the adapters %s (vllm_xargs reft_adapter)", names)
