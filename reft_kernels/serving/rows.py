"""Per-row control of one batched ``generate`` call: sampling, stopping and streaming per request.

Hugging Face ``generate`` takes one generation config for the whole batch. A server batch mixes
requests with their own ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop`` strings, so
the batch runs greedy decoding (``do_sample=False``) with three per-row hooks:

* :class:`RowSampler` (a logits processor): a row with temperature ``t > 0`` samples its next
  token from ``softmax(logits / t)`` restricted to the top-p nucleus, with its own
  ``torch.Generator`` (seeded from the request's ``seed``), and masks every other logit to -inf,
  so the greedy argmax picks exactly the sampled token. The arithmetic is float64 on
  ``z = (logits - max logits) / t``: every ``z <= 0`` and the top token has ``z = 0``, so no
  ``t > 0`` overflows (``1e-40`` gives ``z = -inf`` off the top token) and the nucleus always keeps
  the top token (its mass ``>= 1/V > 0``). The limit ``t -> 0`` or ``top_p -> 0`` is greedy (ties
  aside: the tied top tokens share the mass). Rows with ``t == 0`` are left untouched:
  plain greedy decoding, token for token what ``ReftModel.generate(do_sample=False)`` gives.
  Because each row draws from its own generator, a seeded request gets the same tokens whatever
  else shares its batch.
* :class:`RowStreamer` (a streamer): feeds each step's token of row ``b`` to ``states[b]``.
* :class:`RowStopper` (a stopping criterion): a row is done when its :class:`RowState` says so
  (eos, ``max_tokens`` or a stop string), so the batch ends when every row is done.

A row whose hook raises (sampling, decoding, its ``on_delta`` callback) is *failed*: its state
keeps the exception and counts as finished, so it stops taking part and the other rows of the
batch go on; the engine answers that request alone with the error (see :mod:`.engine`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["SamplingParams", "RowState", "RowSampler", "RowStopper", "RowStreamer", "SEED_RANGE"]

SEED_RANGE = (-2**63, 2**63 - 1)   # OpenAI's seed is an int64; torch.Generator takes any of them


@dataclass
class SamplingParams:
    """One request's decoding settings (OpenAI names). ``temperature == 0`` is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0.0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed={self.seed!r} must be an integer in [-2**63, 2**63 - 1] (an int64)")


class RowState:
    """The tokens and text one request has generated so far, with its stop rules.

    ``push(token)`` appends a generated token: an eos token ends the row (``finish_reason="stop"``,
    the eos is not part of the text); reaching ``max_tokens`` ends it with ``"length"``; a stop
    string in the decoded text ends it with ``"stop"`` and cuts the text before the stop string.
    ``on_delta(text, finished, finish_reason)`` receives the new text as it becomes final (text that
    could still turn out to start a stop string, or an incomplete multi-byte character, is held back).
    ``seed`` is the request's seed, or a random one drawn here, so a rerun of the row (``rerun``) draws
    the same tokens. ``error`` is the exception of a failed row (then ``finished`` is True).
    ``abandoned()`` True means nobody waits for the row any more (a closed stream): it ends at its
    next token with ``finish_reason="abort"``, so it stops costing the batch.
    """

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: Sequence[int],
                 on_delta: Optional[Callable[[str, bool, Optional[str]], None]] = None,
                 seed: Optional[int] = None, abandoned: Optional[Callable[[], bool]] = None):
        self.tokenizer = tokenizer
        self.abandoned = abandoned
        self.seed = seed if seed is not None else (params.seed if params.seed is not None
                                                   else random.SystemRandom().randrange(2**62))
        self.error: Optional[BaseException] = None
        self.params = params
        self.eos_ids = set(int(e) for e in eos_ids)
        self.on_delta = on_delta
        self.tokens: List[int] = []
        self.text = ""
        self.emitted = 0
        self.finished = False
        self.finish_reason: Optional[str] = None
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def rerun(self) -> "RowState":
        """A fresh state for running this row again: same seed, and the text already sent through
        ``on_delta`` is not sent twice (the rerun computes the same tokens)."""
        again = RowState(self.tokenizer, self.params, self.eos_ids, self.on_delta, seed=self.seed,
                         abandoned=self.abandoned)
        again.emitted = self.emitted
        return again

    def fail(self, exc: BaseException) -> None:
        """Take the row out of the batch: it keeps ``exc`` and counts as finished (no callback)."""
        if self.error is None:
            self.error = exc
        self.finished = True

    def push(self, token: int) -> None:
        if self.finished:
            return
        try:
            if self.abandoned is not None and self.abandoned():
                self._finish("abort")
                return
            self._push(token)
        except Exception as exc:  # noqa: BLE001 - this row fails, the batch goes on
            self.fail(exc)

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.text = self.tokenizer.decode([t for t in self.tokens if t not in self.eos_ids],
                                          skip_special_tokens=True)
        for stop in self.params.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self._finish("stop")
                return
        if len(self.tokens) >= self.params.max_tokens:
            self._finish("length")
            return
        safe = len(self.text) - self._holdback
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":   # incomplete character
            safe -= 1
        if safe > self.emitted:
            delta, self.emitted = self.text[self.emitted:safe], safe
            if self.on_delta is not None:
                self.on_delta(delta, False, None)

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished, self.finish_reason = True, reason
        delta, self.emitted = self.text[self.emitted:], max(self.emitted, len(self.text))
        if self.on_delta is not None:
            try:
                self.on_delta(delta, True, reason)
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)

    def close(self) -> None:
        """``generate`` ended (its max_new_tokens): a row still open hit its limit."""
        if not self.finished:
            self._finish("length")

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``softmax(logits / temperature)`` cut to the top-p nucleus, in float64 on
    ``z = (logits - max) / temperature`` (see the module doc: no ``temperature > 0`` overflows)."""
    logits = logits.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(logits.max())):
        raise FloatingPointError(f"the model's logits have no finite maximum ({logits.max().item()})")
    z = (logits - logits.max()) / temperature
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always: its "before" mass is 0)
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class RowSampler:
    """Logits processor: per-row temperature / top-p sampling with per-row generators (see module doc).
    A row whose sampling raises is failed (:meth:`RowState.fail`); the other rows are sampled."""

    def __init__(self, states: Sequence[RowState]):
        self.states = list(states)
        self.generators = []
        for s in self.states:
            g = None
            if s.params.temperature > 0:
                g = torch.Generator()
                g.manual_seed(s.seed)
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if all(g is None or s.finished for s, g in zip(self.states, self.generators)):
            return scores
        scores = scores.clone()
        for row, (s, g) in enumerate(zip(self.states, self.generators)):
            if g is None or s.finished:
                continue
            try:
                token = sample_token(scores[row], s.params.temperature, s.params.top_p, g)
            except Exception as exc:  # noqa: BLE001 - this row fails, the batch goes on
                s.fail(exc)
                continue
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0
        return scores


class RowStopper:
    """Stopping criterion: (B,) bool, True where the row's :class:`RowState` is finished."""

    def __init__(self, states: Sequence[RowState]):
        self.states = list(states)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([s.finished for s in self.states], device=input_ids.device)


class RowStreamer:
    """Streamer: the first ``put`` is the prompt (skipped), then one (B,) token tensor per step."""

    def __init__(self, states: Sequence[RowState]):
        self.states = list(states)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for state, token in zip(self.states, value.reshape(-1).tolist()):
            state.push(int(token))

    def end(self) -> None:
        return None


def hf_hooks(states: Sequence[RowState]):
    """``generate`` keyword arguments wiring the three per-row hooks for ``states``."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    sampler, stopper, streamer = RowSampler(states), RowStopper(states), RowStreamer(states)

    class _Sampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return sampler(input_ids, scores)

    class _Stopper(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stopper(input_ids, scores)

    class _Streamer(BaseStreamer):
        def put(self, value):
            streamer.put(value)

        def end(self):
            streamer.end()

    return {"logits_processor": LogitsProcessorList([_Sampler()]),
            "stopping_criteria": StoppingCriteriaList([_Stopper()]), "streamer": _Streamer()}
