"""One step's edits: which flattened tokens each layer edits, with which stacked adapter slot.

vLLM runs every scheduled token of every request as one flat sequence; request ``i`` (batch index)
owns rows ``query_start_loc[i] : query_start_loc[i+1]``, with consecutive absolute positions
``p0 .. p1``. For a request with adapter ``a`` and prompt length ``L``, intervention ``e`` of ``a``
edits position ``p`` when ``p`` is in its kind's range (see :mod:`.store`):

    first: [0, f)      last: [L - l, L)      both: either,   f = min(L//2, first_n), l = min(L//2, last_n)

so the edited rows are the intersection of those ranges with ``[p0, p1]``, shifted to row
offsets. A request with a decode-time rule (``GeneratedPositions``, as
``ReftModel.generate(generated_positions=...)``) also has every intervention edit each generated
position ``p = L + j`` (``p >= L``) whose index ``j`` the rule selects, in whatever step computes it
(a decode step, or a recompute after preemption). This depends only on absolute positions and the prompt length, never on how the prompt
was split into chunks or how much of it came from the prefix cache: chunked prefill and cache
hits edit exactly the tokens a single full-prompt forward would (the cached KV rows themselves are
kept apart per adapter by the cache salt, :func:`reft_kernels.vllm_plugin.cache_salt`).

The result maps ``layer -> [(group key, rows (N,), slots (N,)), ...]`` in stage order; the model
applies each item with one call of the per-row op.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Tuple

import torch

__all__ = ["build_step_plan", "edited_ranges"]

log = logging.getLogger("reft_kernels.vllm")
_warned: set = set()


def edited_ranges(kind: str, prompt_len: int, first_n: int, last_n: int) -> List[Tuple[int, int]]:
    """Half-open position ranges an intervention of ``kind`` edits in a prompt of ``prompt_len``."""
    f = min(prompt_len // 2, first_n)
    l_ = min(prompt_len // 2, last_n)
    out = []
    if kind in ("first", "both") and f > 0:
        out.append((0, f))
    if kind in ("last", "both") and l_ > 0:
        out.append((prompt_len - l_, prompt_len))
    return out


def build_step_plan(store, rows: Mapping[int, Tuple[str, int, object]], query_start_loc: torch.Tensor,
                    positions: torch.Tensor) -> Dict[int, list]:
    """``{layer: [(group_key, rows, slots), ...]}`` for this step (empty when nothing is edited).

    ``rows``: batch index -> (adapter name, prompt length, decode-time rule or None) of the requests
    with an adapter;
    ``query_start_loc`` (num_reqs + 1,) and ``positions`` (num_tokens,) on the CPU.
    """
    loc = query_start_loc.tolist()
    num_reqs = len(loc) - 1
    pos = positions
    acc: Dict[Tuple, Tuple[list, list]] = {}
    for index, (name, prompt_len, generated) in rows.items():
        if index >= num_reqs:
            continue
        start, end = loc[index], loc[index + 1]
        if end <= start:
            continue
        adapter = store.adapters.get(name)
        if adapter is None:
            if name not in _warned:
                _warned.add(name)
                log.error("request names adapter %r, which is not loaded (loaded: %s); it runs on the base model",
                          name, sorted(store.adapters))
            continue
        p0 = int(pos[start])
        p1 = p0 + (end - start)               # exclusive; a request's positions are consecutive
        spans = []
        if p0 < prompt_len:                    # prompt tokens in this step
            for entry in adapter.entries:
                for lo, hi in edited_ranges(entry.kind, prompt_len, adapter.first_n, adapter.last_n):
                    a, b = max(lo, p0), min(hi, p1)
                    if a < b:
                        spans.append((entry, a, b))
        if generated is not None and p1 > prompt_len:   # generated tokens L + j the rule selects
            for p in range(max(p0, prompt_len), p1):
                if generated.hits(p - prompt_len):
                    spans.extend((entry, p, p + 1) for entry in adapter.entries)
        for entry, a, b in spans:
            lists = acc.setdefault(entry.group, ([], []))
            lists[0].append(torch.arange(start + a - p0, start + b - p0))
            lists[1].append(torch.full((b - a,), entry.slot, dtype=torch.int64))
    plan: Dict[int, list] = {}
    for key in sorted(acc, key=lambda k: (k[0], k[1])):
        r, s = acc[key]
        plan.setdefault(key[0], []).append((key, torch.cat(r), torch.cat(s)))
    return plan
