"""The serving engine: named adapters on one frozen base model, and a batching queue. No HTTP here.

``Engine.submit(request, group)`` queues a :class:`GenerationRequest` and returns a future. One
worker thread collects requests: it takes the first waiting request, then waits ``batch_window_s``
for more; each arrival extends the wait by one window (at most 4 windows after the first request),
so a burst spread over a few milliseconds shares a batch of at most ``max_batch_size`` requests.
The queue is round-robin over ``group`` (the HTTP request a prompt came from, see
:mod:`.scheduler`), so a request with many prompts does not hold back a small one. The batch runs
through :meth:`Engine.generate_batch`, also callable directly (the benchmark does).

Failure isolation: a request's failure is that request's alone. A row whose sampling, decoding or
streaming callback raises is failed by its :class:`~.rows.RowState` and the other rows go on; a
request whose adapter was unloaded, or whose edit positions cannot be computed, is left out of the
batch. If a batched ``generate`` itself raises, each of its requests is run again alone, so the
requests that did not cause it still get their answer (the same one: greedy rows are
deterministic, sampled rows keep their seed). A failed request's future carries its exception.

A batch is left-padded; row ``b`` with a prompt of ``L_b`` tokens and ``pad_b = W - L_b`` pad tokens
(``W`` the batch width) is edited at ``prompt_locations(L_b, rule_b) + pad_b``, the rule being the
adapter's training position rule (:mod:`reft_kernels.artifacts`), exactly as ``reft-kernels generate``
(both build their batches with :func:`~reft_kernels.data.positions.left_pad` and
:func:`~reft_kernels.data.positions.prompt_locations`).
Decoding settings are per row (see :mod:`.rows`).

Two ways to run a batch (``mode``):

* ``"mixed"`` (the default): ONE ``generate`` for the whole batch, each row with its own adapter
  (``adapter_ids`` on one ReftModel holding every adapter by name; rows without an adapter pass
  through).
* ``"grouped"``: rows are grouped by adapter and each group runs as its own ``generate`` (the same
  ReftModel, one adapter per call): baseline (b) of ``benchmarks/bench_serving.py``.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..artifacts import AdapterError, AdapterSpec
from ..data.positions import left_pad, pad_locations, prompt_locations
from .rows import RowState, SamplingParams, hf_hooks
from .scheduler import Empty, QueueWorker

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "UnknownAdapterError"]

log = logging.getLogger("reft_kernels.serving")


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not loaded."""


@dataclass
class GenerationRequest:
    """One prompt to complete. ``adapter=None`` is the base model alone. ``on_delta`` is called from
    the engine thread with ``(text, finished, finish_reason)`` as the text grows."""

    prompt_ids: List[int]
    adapter: Optional[str]
    params: SamplingParams
    on_delta: Optional[Callable[[str, bool, Optional[str]], None]] = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abandoned: bool = False   # set when nobody waits any more (a closed stream): the row stops early


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int
    batch_id: int      # which engine batch served it (requests sharing a batch share the id)
    batch_size: int    # how many requests that batch held


class Engine(QueueWorker):
    """Adapters on one base model plus the batching worker; see the module docstring."""

    def __init__(self, model, tokenizer, *, mode: str = "auto", max_batch_size: int = 16,
                 batch_window_s: float = 0.005, backend: str = "auto", default_positions: Optional[str] = None,
                 default_template: Optional[str] = None):
        mode = "mixed" if mode == "auto" else mode
        if mode not in ("mixed", "grouped"):
            raise ValueError(f"mode={mode!r}; use 'mixed', 'grouped' or 'auto'")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.mode = mode
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.backend = backend
        self.default_positions = default_positions
        self.default_template = default_template
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        self.specs: Dict[str, AdapterSpec] = {}
        self._holder = None                          # one ReftModel holding every adapter by name
        self._n_interventions: Dict[str, int] = {}
        self._lock = threading.RLock()               # one generate or adapter change at a time
        self._batch_ids = itertools.count(1)
        self.stats = {"batches": 0, "requests": 0, "failed_requests": 0, "max_batch": 0, "generate_calls": 0,
                      "last_batches": []}

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> AdapterSpec:
        """Load ``path`` under ``name``; raises AdapterError (bad path/config) or ValueError (name taken)."""
        with self._adding_adapter(name, path) as spec:
            try:
                n = self._load(spec)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AdapterError(f"adapter {name!r} could not be loaded from {spec.adapter_dir!r}: {exc}") from None
            self.model.eval()
            self.model.requires_grad_(False)
            self._n_interventions[name] = n
            self.specs[name] = spec
        log.info("loaded adapter %r from %s (positions %s, %d interventions)", name, spec.adapter_dir,
                 spec.positions, n)
        return spec

    def _load(self, spec: AdapterSpec) -> int:
        """Load the checkpoint; the number of its interventions (= location slots it reads)."""
        from ..model.config import ReftConfig
        from ..model.reft_model import ReftModel
        if self._holder is None:      # one ReftModel holding every adapter by name
            self._holder = ReftModel(ReftConfig(representations=[]), self.model, backend=self.backend)
            self._holder.delete_adapter(self._holder.adapter_names[0])
        self._holder.load_adapter(spec.adapter_dir, adapter_name=spec.name)
        return len(self._holder.adapter_config(spec.name).representations)

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; queued requests for it fail with UnknownAdapterError."""
        with self._lock:
            if name not in self.specs:
                raise UnknownAdapterError(name)
            self._holder.delete_adapter(name)
            del self.specs[name], self._n_interventions[name]
            self.model.eval()
            self.model.requires_grad_(False)
        log.info("unloaded adapter %r", name)

    def warmup(self) -> None:
        """One tiny batch (the base model and every adapter, one token each) so the first request
        does not pay for kernel builds or lazy initialisation; the counters are reset after."""
        prompt = list(range(min(8, len(self.tokenizer))))   # long enough for every position rule to edit
        names = [None, *self.specs]
        self.generate_batch([GenerationRequest(prompt, n, SamplingParams(max_tokens=1)) for n in names])
        self.stats.update(batches=0, requests=0, failed_requests=0, max_batch=0, generate_calls=0, last_batches=[])

    # -- batching queue: start / close / submit come from QueueWorker (scheduler.py) ------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            start = time.monotonic()
            deadline = start + self.batch_window_s
            stop = False
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                # requests still arriving: wait one more window for stragglers, at most 4 windows in all
                deadline = min(time.monotonic() + self.batch_window_s, start + 4 * self.batch_window_s)
            self._serve(batch)
            if stop:
                return

    def _serve(self, batch: List[GenerationRequest]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        try:
            results = self.generate_batch(live, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - only reached by a bug outside the rows; fail them all
            log.exception("batch failed")
            results = [exc] * len(live)
        for request, result in zip(live, results):
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)

    # -- one batch --------------------------------------------------------------------------------
    def generate_batch(self, requests: Sequence[GenerationRequest], return_exceptions: bool = False) -> list:
        """Run ``requests`` as one batch (``mode``); a list of GenerationResult, or, with
        ``return_exceptions``, the exception of each request that failed (see the module doc:
        the others are answered). Without it, the first failure is raised."""
        with self._lock:
            batch_id = next(self._batch_ids)
            out: list = [None] * len(requests)
            states = {}
            for i, r in enumerate(requests):
                if r.adapter is not None and r.adapter not in self.specs:
                    out[i] = UnknownAdapterError(r.adapter)
                else:
                    states[i] = RowState(self.tokenizer, r.params, self.eos_ids, r.on_delta,
                                         abandoned=lambda r=r: r.abandoned)
            if self.mode == "mixed":
                groups = [list(states)] if states else []
            else:
                by_adapter: Dict[Optional[str], List[int]] = {}
                for i in states:
                    by_adapter.setdefault(requests[i].adapter, []).append(i)
                groups = list(by_adapter.values())
            calls = 0
            with torch.inference_mode():
                for rows in groups:
                    calls += self._run_isolated(requests, states, rows)
            for i, s in states.items():
                if s.error is not None:
                    out[i] = s.error
                    log.warning("request %d of batch %d failed: %r", i, batch_id, s.error)
                else:
                    out[i] = GenerationResult(text=s.text, token_ids=list(s.tokens),
                                              finish_reason=s.finish_reason or "length",
                                              prompt_tokens=len(requests[i].prompt_ids), batch_id=batch_id,
                                              batch_size=len(requests))
            self.stats["batches"] += 1
            self.stats["requests"] += len(requests)
            self.stats["failed_requests"] += sum(
                isinstance(o, BaseException) for o in out)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(requests))
            self.stats["last_batches"] = (self.stats["last_batches"] + [
                {"batch_id": batch_id, "size": len(requests), "generate_calls": calls,
                 "adapters": sorted({str(r.adapter) for r in requests})}])[-32:]
            if not return_exceptions:
                for o in out:
                    if isinstance(o, BaseException):
                        raise o
            return out

    def _run_isolated(self, requests, states: Dict[int, RowState], rows: List[int]) -> int:
        """One ``generate`` over ``rows``; if it raises, each row again alone (a fresh state with the
        same seed), so only the row that causes the error fails. The number of ``generate`` calls."""
        try:
            self._generate_rows([requests[i] for i in rows], [states[i] for i in rows])
            return 1
        except Exception as exc:  # noqa: BLE001 - isolate: which row caused it?
            if len(rows) == 1:
                states[rows[0]].fail(exc)
                return 1
            log.warning("a batch of %d rows failed (%r); running each row alone", len(rows), exc)
        for i in rows:
            states[i] = states[i].rerun()
            try:
                self._generate_rows([requests[i]], [states[i]])
            except Exception as exc:  # noqa: BLE001
                states[i].fail(exc)
        return 1 + len(rows)

    def _generate_rows(self, requests: Sequence[GenerationRequest], states: Sequence[RowState]) -> None:
        """One ``generate`` over ``requests`` (left-padded), feeding tokens to ``states``."""
        device = next(self.model.parameters()).device
        ids, mask, pads = left_pad([r.prompt_ids for r in requests], self.pad_id)
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                      max_new_tokens=max(r.params.max_tokens for r in requests), pad_token_id=self.pad_id,
                      eos_token_id=(self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids) or None, **hf_hooks(states))
        adapters = [r.adapter for r in requests]
        slots = max([self._n_interventions[a] for a in adapters if a is not None], default=0)
        if slots:
            rows = []
            for r, pad in zip(requests, pads):
                if r.adapter is None:
                    rows.append([[-1]] * slots)
                    continue
                spec = self.specs[r.adapter]
                rows.append(prompt_locations(len(r.prompt_ids), spec.positions, self._n_interventions[r.adapter],
                                             spec.share_weights, pad=pad, num_slots=slots))
            locs = pad_locations(rows).to(device)
        self.stats["generate_calls"] += 1
        if not slots:
            self.model.generate(**kwargs)
        else:   # mixed: every row its own adapter; grouped: one adapter for all rows
            self._holder.generate(intervention_locations=locs, adapter_ids=adapters, **kwargs)
        for s in states:   # generate ended (max_new_tokens reached): rows still open hit their limit
            s.close()
