"""The engine's waiting room: a queue that is fair across client requests.

One HTTP request may carry many prompts (``/v1/completions`` with a list), and each prompt is one
:class:`~.engine.GenerationRequest`. A plain FIFO would make a one-prompt request wait behind every
prompt of a large request that arrived just before it. :class:`FairQueue` keeps one FIFO per
*group* (the HTTP request the prompt came from) and hands items out round-robin over the groups
that have items waiting: with groups ``A`` (256 prompts) and ``B`` (1 prompt) waiting, the next
batch holds ``A1, B1, A2, A3, ...``, so ``B`` is served in the first batch instead of the 17th.
Within a group the order is kept. ``None`` is the stop signal and is delivered after the items
already queued.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Deque, Hashable, Optional

__all__ = ["FairQueue", "Empty", "QueueWorker"]


class Empty(Exception):
    """``get`` timed out with nothing queued."""


class FairQueue:
    """Round-robin over groups, FIFO inside a group; thread-safe (``put`` from any thread)."""

    def __init__(self):
        self._groups: "collections.OrderedDict[Hashable, Deque[Any]]" = collections.OrderedDict()
        self._cond = threading.Condition()
        self._stopped = False
        self._anonymous = 0

    def put(self, item: Any, group: Optional[Hashable] = None) -> None:
        """Queue ``item`` in ``group`` (``None``: a group of its own); ``put(None)`` stops the reader."""
        with self._cond:
            if item is None:
                self._stopped = True
            else:
                if group is None:
                    self._anonymous += 1
                    group = ("anonymous", self._anonymous)
                self._groups.setdefault(group, collections.deque()).append(item)
            self._cond.notify()

    def get(self, timeout: Optional[float] = None) -> Any:
        """The next item (round-robin over groups), ``None`` once stopped and drained; raises
        :class:`Empty` after ``timeout`` seconds with nothing queued (``None``: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._groups:
                if self._stopped:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Empty()
                self._cond.wait(left)
            group, items = next(iter(self._groups.items()))
            item = items.popleft()
            del self._groups[group]
            if items:                       # the group goes to the back of the round
                self._groups[group] = items
            return item

    def qsize(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._groups.values())

    def __len__(self) -> int:
        return self.qsize()


class QueueWorker:
    """The request side every engine shares: ``submit`` puts a request into a :class:`FairQueue`
    (one group per HTTP request), and one daemon thread runs the engine's ``_loop`` over it.
    ``start`` makes a fresh queue (a closed one holds its stop signal); ``close`` sends the stop
    signal (``None``) and joins the thread. :meth:`_adding_adapter` is the engines' shared start of
    ``load_adapter`` (they set ``specs``, ``_lock``, ``default_positions``, ``default_template``)."""

    _worker_name = "reft-engine"
    _worker: Optional[threading.Thread] = None
    _queue: FairQueue

    def _loop(self) -> None:  # pragma: no cover - every engine defines its own
        raise NotImplementedError

    def start(self):
        if self._worker is None:
            self._queue = FairQueue()
            self._worker = threading.Thread(target=self._loop, name=self._worker_name, daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)
            self._worker = None

    @contextlib.contextmanager
    def _adding_adapter(self, name: str, path: str):
        """Resolve adapter ``name`` at ``path`` (:func:`reft_kernels.artifacts.read_adapter_spec`:
        AdapterError) and hold the engine's lock while the body loads it; ValueError if ``name`` is
        taken."""
        from ..artifacts import read_adapter_spec
        spec = read_adapter_spec(name, path, self.default_positions, self.default_template)
        with self._lock:
            if name in self.specs:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            yield spec

    def submit(self, request, group: Optional[Hashable] = None):
        """Queue ``request`` (a :class:`~.engine.GenerationRequest`) and return its future; requests
        sharing ``group`` (one HTTP request's prompts) take turns with other groups."""
        if self._worker is None:
            raise RuntimeError("the engine is not running; call start() first")
        self._queue.put(request, group)
        return request.future
