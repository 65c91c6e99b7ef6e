"""The serving engine on vLLM: the same interface as :class:`~.engine.Engine`, vLLM underneath.

``reft-kernels serve --engine vllm`` builds this instead of the HF engine; the HTTP layer
(:mod:`.app`) is the same. vLLM brings its paged KV cache, continuous batching, prefix caching and
tensor parallelism; the reft_kernels vLLM plugin (:mod:`reft_kernels.vllm_plugin`) brings the
adapters. Each submitted :class:`~.engine.GenerationRequest` becomes one vLLM request with

* ``extra_args={"reft_adapter": NAME}`` (the plugin's per-request selector),
* the prompt's ``cache_salt`` from :func:`reft_kernels.vllm_plugin.cache_salt` (adapter name, its
  load number, and the prompt length for last-k adapters), so prefix caching can never hand one
  request a KV block computed under another request's edits.

One thread drives vLLM's ``LLMEngine``: it adds queued requests, calls ``step()`` while any are
running (vLLM batches them continuously), streams text through each request's ``on_delta`` and
resolves its future. Adapter loads and unloads run in every worker through
``collective_rpc`` (:mod:`reft_kernels.vllm_plugin.worker`), between steps.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from typing import Dict, Optional

from ..artifacts import AdapterError, AdapterSpec
from .engine import GenerationRequest, GenerationResult, UnknownAdapterError
from .scheduler import Empty, QueueWorker

__all__ = ["VllmEngine", "vllm_available"]

log = logging.getLogger("reft_kernels.serving")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VllmEngine(QueueWorker):
    """Named adapters on one base model in vLLM; see the module docstring."""

    mode = "vllm"
    _worker_name = "reft-vllm-engine"

    def __init__(self, model: str, *, dtype: str = "float32", max_batch_size: int = 16,
                 max_model_len: Optional[int] = None, default_positions: Optional[str] = None,
                 default_template: Optional[str] = None, vllm_args: Optional[dict] = None):
        from transformers import AutoTokenizer
        from vllm import EngineArgs, LLMEngine

        from ..vllm_plugin import REFT_LOGITS_PROCESSOR
        from ..vllm_plugin.worker import REFT_WORKER_EXTENSION
        kwargs = dict(model=model, dtype=dtype, max_num_seqs=max_batch_size, max_model_len=max_model_len,
                      logits_processors=[REFT_LOGITS_PROCESSOR], worker_extension_cls=REFT_WORKER_EXTENSION,
                      enforce_eager=True)   # the plugin's edits run in eager mode (see vllm_plugin.model)
        kwargs.update(vllm_args or {})
        self.llm = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_batch_size = max_batch_size
        self.batch_window_s = 0.0
        self.default_positions = default_positions
        self.default_template = default_template
        self.specs: Dict[str, AdapterSpec] = {}
        self._versions: Dict[str, int] = {}
        self._loads = itertools.count(1)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()          # adapter changes vs. the step loop
        self._running: Dict[str, tuple] = {}
        self.stats = {"requests": 0, "failed_requests": 0, "steps": 0, "max_running": 0}
        self._publish()

    def _publish(self) -> None:
        """Tell vLLM's front end (this process) which names requests may select (vllm_plugin.known)."""
        from ..vllm_plugin import publish_adapters
        publish_adapters(list(self.specs))

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> AdapterSpec:
        with self._adding_adapter(name, path) as spec:
            try:
                self.llm.collective_rpc("reft_load_adapter", args=(name, spec.adapter_dir, spec.positions,
                                                                   spec.share_weights))
            except Exception as exc:  # noqa: BLE001 - the worker's error, as the HF engine reports it
                raise AdapterError(f"adapter {name!r} could not be loaded from {spec.adapter_dir!r}: {exc}") from None
            self.specs[name] = spec
            self._versions[name] = next(self._loads)
            self._publish()
        log.info("loaded adapter %r from %s (positions %s) into vLLM", name, spec.adapter_dir, spec.positions)
        return spec

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.specs:
                raise UnknownAdapterError(name)
            del self.specs[name], self._versions[name]   # new requests are refused from here on
            self._publish()
            self.llm.collective_rpc("reft_unload_adapter", args=(name,))

    def warmup(self) -> None:
        """One token through the base model and every adapter (vLLM builds its kernels on first use)."""
        from .rows import SamplingParams
        self.start()
        prompt = list(range(1, 9))
        futures = [self.submit(GenerationRequest(prompt, n, SamplingParams(max_tokens=1))) for n in [None, *self.specs]]
        concurrent.futures.wait(futures)
        self.stats.update(requests=0, failed_requests=0, steps=0, max_running=0)

    # -- requests ---------------------------------------------------------------------------------
    # start / close / submit come from QueueWorker (scheduler.py)

    def _vllm_request(self, request: GenerationRequest):
        from vllm import SamplingParams as VllmParams

        from ..vllm_plugin import ADAPTER_KEY, reft_prompt
        p = request.params
        adapter = request.adapter
        spec = self.specs[adapter] if adapter is not None else None
        prompt = reft_prompt(request.prompt_ids, adapter, spec.positions if spec else None,
                             str(self._versions.get(adapter, "")))
        params = VllmParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                            stop=list(p.stop) or None, extra_args={ADAPTER_KEY: adapter} if adapter else None)
        return prompt, params

    def _add(self, request: GenerationRequest) -> None:
        if not request.future.set_running_or_notify_cancel():
            return
        with self._lock:
            if request.adapter is not None and request.adapter not in self.specs:
                request.future.set_exception(UnknownAdapterError(request.adapter))
                return
            try:
                prompt, params = self._vllm_request(request)
                rid = f"reft-{next(self._ids)}"
                self.llm.add_request(rid, prompt, params)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                request.future.set_exception(exc)
                return
        self._running[rid] = (request, [0])
        self.stats["requests"] += 1

    def _loop(self) -> None:
        stop = False
        while not stop:
            block = not self._running
            while True:
                try:
                    item = self._queue.get(timeout=None if block else 0)
                except Empty:
                    break
                block = False
                if item is None:
                    stop = True
                    break
                self._add(item)
            if stop or not self._running:
                continue
            try:
                with self._lock:
                    outputs = self.llm.step()
            except Exception as exc:  # noqa: BLE001 - the engine failed: fail what it was running
                log.exception("vLLM step failed")
                for request, _ in self._running.values():
                    request.future.set_exception(exc)
                self.stats["failed_requests"] += len(self._running)
                self._running.clear()
                continue
            self.stats["steps"] += 1
            self.stats["max_running"] = max(self.stats["max_running"], len(self._running))
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out) -> None:
        entry = self._running.get(out.request_id)
        if entry is None:
            return
        request, sent = entry
        completion = out.outputs[0]
        text = completion.text
        reason = completion.finish_reason if out.finished else None
        if request.on_delta is not None and (len(text) > sent[0] or out.finished):
            try:
                request.on_delta(text[sent[0]:], out.finished, reason)
            except Exception as exc:  # noqa: BLE001 - a failing stream fails its request only
                self._running.pop(out.request_id)
                self.llm.abort_request([out.request_id])
                request.future.set_exception(exc)
                return
            sent[0] = len(text)
        if out.finished:
            self._running.pop(out.request_id)
            request.future.set_result(GenerationResult(
                text=text, token_ids=list(completion.token_ids), finish_reason=reason or "length",
                prompt_tokens=len(request.prompt_ids), batch_id=self.stats["steps"], batch_size=len(self._running) + 1))
