"""Per-call edit state: which token positions of the current forward the hooks edit.

Positions are absolute token indices in the padded input (-1 = none). Prompt positions come from
the caller (``unit_locations`` / ``intervention_locations``); generated tokens are reached by a
:class:`GeneratedPositions` rule. Each model call covers a window of tokens
``[offset, offset + T)`` (offset = the KV-cache length, see :func:`reft_kernels.model.patcher.window_offset`);
:meth:`EditState.window` turns the absolute positions into window-local ones. The same absolute
position is therefore edited whether the call is a prefill, a cached decode step or a full
recompute without a cache: cached and uncached generation apply the same edits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["EditState", "GeneratedPositions"]


@dataclass(frozen=True)
class GeneratedPositions:
    """Which generated tokens ``generate`` edits (decode-time interventions).

    Generated token ``j`` (0-based: ``j = 0`` is the first new token) sits at absolute position
    ``L + j``, with ``L`` the padded prompt length (the same in every row of a left-padded
    batch). Its hidden states are computed when it is fed back as input, at decode step ``j + 1``
    (the last generated token is never fed back, so it is never edited; this is also pyvene's
    ``intervene_on_prompt=False``: each decode step edits the token it feeds in). Token ``j`` is
    edited when ``j >= start`` and ``(j - start) % every == 0``, or when ``j`` is in ``steps``:

    * ``GeneratedPositions(every=1)`` (``"all"``): every generated token;
    * ``GeneratedPositions(every=k)`` (an int ``k``): tokens ``0, k, 2k, ...``;
    * ``GeneratedPositions(steps=(s,))`` (a list ``[s]``): a midfix at generated token ``s``.
    """

    every: Optional[int] = None
    steps: tuple = ()
    start: int = 0

    def __post_init__(self):
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every={self.every!r} must be a positive int (1 = every generated token)")
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start={self.start!r} must be an int >= 0 (a generated-token index)")
        steps = tuple(self.steps)
        if any(not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError(f"steps={self.steps!r} must be generated-token indices >= 0")
        object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        if self.every is None and not steps:
            raise ValueError("GeneratedPositions edits nothing: give every=k and/or steps=[...]")

    @classmethod
    def parse(cls, value) -> Optional["GeneratedPositions"]:
        """``None``, ``"all"``, an int k (every k-th token), a list of token indices, or an instance."""
        if value is None or isinstance(value, cls):
            return value
        if value == "all":
            return cls(every=1)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(every=value)
        if isinstance(value, (list, tuple, set, frozenset)):
            return cls(steps=tuple(value))
        raise TypeError(f"generated_positions={value!r}: pass 'all', an int k (every k-th generated token), "
                        "a list of generated-token indices (e.g. [5] for a midfix) or a GeneratedPositions")

    def hits(self, j: int) -> bool:
        if j in self.steps:
            return True
        return self.every is not None and j >= self.start and (j - self.start) % self.every == 0


class EditState:
    """Where one call edits: its absolute positions, turned into window-local ones per model call.

    ``positions[i]`` (B, P_i) holds location i's absolute token indices (-1 = none) in the
    (padded) input; ``None`` means "every position of the window" (each call edits all the tokens it
    processes; ``ReftModel.generate`` turns ``None`` into every *prompt* position first). A forward
    covering tokens [offset, offset + T) edits the listed positions inside that window:
    ``local[i] = where(offset <= p < offset + T, p - offset, -1)``, repeated along the batch when
    generate expands it (beam search). So a prefill edits the prompt, cached decode steps edit no
    prompt token (skipped on the host when ``max_position`` is known) and a ``use_cache=False``
    recompute re-applies the edit. With ``generated`` (a :class:`GeneratedPositions`) and
    ``prompt_length`` L, the window's generated tokens ``L + j`` that the rule selects are appended
    to every location, for every row. The call's plan
    (:class:`reft_kernels.model.plan.CallPlan`) holds one and asks it per model call.
    """

    __slots__ = ("positions", "max_position", "generated", "prompt_length")

    def __init__(self, positions=(), max_position: Optional[int] = None,
                 generated: Optional[GeneratedPositions] = None, prompt_length: Optional[int] = None):
        self.positions = list(positions)
        self.max_position = max_position
        self.generated = generated
        self.prompt_length = prompt_length

    def _generated_local(self, seq_len: int, offset: int) -> list:
        if self.generated is None:
            return []
        start = max(offset, self.prompt_length)
        return [p - offset for p in range(start, offset + seq_len) if self.generated.hits(p - self.prompt_length)]

    def window(self, batch: int, seq_len: int, offset, device) -> Optional[list]:
        """Window-local positions for a forward over ``seq_len`` tokens after ``offset`` cached ones."""
        prompt_done = self.max_position is not None and offset > self.max_position
        extra = self._generated_local(seq_len, offset)
        if prompt_done and not extra:
            return None
        extra_t = torch.tensor(extra, dtype=torch.int64, device=device).expand(batch, len(extra)) if extra else None
        local = []
        for p in self.positions:
            if prompt_done:
                p = None
            elif p is None:   # already window-local: every token of this call
                p = torch.arange(seq_len, device=device).expand(batch, seq_len)
            else:
                if p.shape[0] != batch:
                    if batch % p.shape[0]:
                        raise ValueError(f"the model was called with batch {batch} but positions were given "
                                         f"for {p.shape[0]} rows; pass one position row per input row")
                    p = p.repeat_interleave(batch // p.shape[0], dim=0)
                if not (offset == 0 and self.max_position is not None and self.max_position < seq_len):
                    p = torch.where((p >= offset) & (p < offset + seq_len), p - offset, torch.full_like(p, -1))
            if extra_t is not None:
                p = extra_t if p is None else torch.cat([p, extra_t], dim=1)
            local.append(p)
        return local
