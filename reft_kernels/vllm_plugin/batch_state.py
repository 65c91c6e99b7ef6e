"""Which adapter each request of the running batch uses, via vLLM's public logits-processor API.

A request names its adapter in ``SamplingParams.extra_args={"reft_adapter": NAME}`` (``vllm_xargs``
over the OpenAI server), and optionally decode-time edits with ``"reft_generated_positions"``:
``"all"``, ``k`` (every k-th generated token) or a list of generated-token indices, the values
``ReftModel.generate(generated_positions=...)`` takes. vLLM calls a v1 logits processor's ``update_state(BatchUpdate)`` before
every forward with the requests added to, removed from and moved within the persistent batch:
each added one with its batch index, sampling params and prompt token ids. :class:`ReftBatchState`
keeps ``index -> (adapter name, prompt length, decode-time rule)`` from those updates and publishes it for the
model of the same worker process (:func:`current`). Its ``apply`` leaves the logits unchanged.

Load it with ``LLM(..., logits_processors=[REFT_LOGITS_PROCESSOR])`` or
``vllm serve ... --logits-processors reft_kernels.vllm_plugin.batch_state:ReftBatchState``
(``reft-kernels serve --engine vllm`` does this itself). The model refuses to run adapters without
it (:func:`require`), so a missing processor is an error, not a silently unedited answer.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

__all__ = ["ReftBatchState", "ADAPTER_KEY", "GENERATED_KEY", "current", "require"]

from .known import ADAPTER_KEY, GENERATED_KEY
_active: Optional["ReftBatchState"] = None


def adapter_of(params) -> Optional[str]:
    """The adapter a request's SamplingParams name (None: the base model)."""
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(ADAPTER_KEY)


def generated_of(params):
    """The request's decode-time edit rule (:class:`~reft_kernels.edit_state.GeneratedPositions`), or None."""
    from ..model.edit_state import GeneratedPositions
    extra = getattr(params, "extra_args", None) or {}
    return GeneratedPositions.parse(extra.get(GENERATED_KEY))


class ReftBatchState(LogitsProcessor):
    """Tracks ``batch index -> (adapter, prompt length, decode-time rule)``; never changes logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """vLLM calls this in its front end for every request, before any worker sees it: a request
        naming no loaded adapter is refused here (400 over HTTP), never answered by the base model."""
        from vllm.exceptions import VLLMValidationError

        from . import known
        name = adapter_of(sampling_params)
        if name is None:
            if (getattr(sampling_params, "extra_args", None) or {}).get(GENERATED_KEY) is not None:
                raise VLLMValidationError(f"extra_args[{GENERATED_KEY!r}] edits generated tokens with an adapter; "
                                          f"name one with extra_args[{ADAPTER_KEY!r}]", parameter=GENERATED_KEY)
            return
        where = f"extra_args[{ADAPTER_KEY!r}] (vllm_xargs over HTTP)"
        if not isinstance(name, str) or not name:
            raise VLLMValidationError(f"{where}={name!r} must be an adapter name (a non-empty string), or left "
                                      "out for the base model", parameter=ADAPTER_KEY, value=name)
        try:
            generated_of(sampling_params)
        except (TypeError, ValueError) as exc:
            raise VLLMValidationError(f"extra_args[{GENERATED_KEY!r}]: {exc}", parameter=GENERATED_KEY,
                                      value=(sampling_params.extra_args or {}).get(GENERATED_KEY)) from None
        names = known.known()
        if names is None:
            raise VLLMValidationError(
                f"{where}={name!r}: this vLLM front end does not know which ReFT adapters its workers hold, "
                "so it cannot tell a loaded name from a typo; under `vllm serve` set VLLM_PLUGINS to include "
                "'reft_kernels' (it loads the plugin's endpoint part, which reads --hf-overrides' reft_adapters); "
                "with LLM(...) call reft_kernels.vllm_plugin.publish_adapters(llm) once",
                parameter=ADAPTER_KEY, value=name)
        if name not in names:
            raise VLLMValidationError(f"{where}={name!r} names no loaded ReFT adapter; loaded: "
                                      f"{known.describe(names)} (leave it out for the base model)",
                                      parameter=ADAPTER_KEY, value=name)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        global _active
        self.rows: Dict[int, Tuple] = {}   # batch index -> (adapter, prompt length, GeneratedPositions | None)
        self.batch_size = 0
        _active = self

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        rows = self.rows
        for index in batch_update.removed:
            rows.pop(index, None)
        for index, params, prompt_ids, _output_ids in batch_update.added:
            name = adapter_of(params)
            if name is None:
                rows.pop(index, None)
            else:
                rows[index] = (name, len(prompt_ids) if prompt_ids is not None else -1, generated_of(params))
        for a, b, direction in batch_update.moved:
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if ra is not None:
                rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                rows[a] = rb
        self.batch_size = batch_update.batch_size

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def current() -> Optional[ReftBatchState]:
    """This process's batch state (None until vLLM built the logits processor)."""
    return _active


def require() -> ReftBatchState:
    """The batch state, or a clear error when vLLM was started without the processor."""
    if _active is None:
        raise RuntimeError("reft_kernels adapters are loaded but vLLM runs without the ReFT logits processor, so "
                           "requests cannot select adapters; pass logits_processors=[\"reft_kernels.vllm_plugin."
                           "batch_state:ReftBatchState\"] to LLM(...) or --logits-processors "
                           "reft_kernels.vllm_plugin.batch_state:ReftBatchState to vllm serve")
    return _active
