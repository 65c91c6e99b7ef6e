"""Which edits each hooked site applies to which batch rows, for one call with named adapters.

Every batch row ``b`` carries a *chain* ``C_b``: the adapters applied to it, in order (``[]`` = no
adapter, ``[A]`` = one adapter, ``[A, B]`` = the composition ``Phi_B o Phi_A``). At a site (a hooked
module's output or input), row b's edits are, in order,

    L_b = [(a, i) for a in C_b for i in (the interventions of adapter a at this site, config order)]

and the hidden state of row b at that site becomes ``... o Phi_{L_b[1]} o Phi_{L_b[0]} (h)`` at the
positions of each edit's location ``i`` (intervention i of every adapter uses location i of the
call's ``unit_locations``). Sites are visited in the model's forward order, so over the whole model
the chain composes like applying the adapters one after another where they share a site, and
like installing them all at once where they do not.

Stage k of a site applies the k-th entry of every row's ``L_b``; rows in one stage are disjoint, so
a stage is one :class:`SingleEdit` when all its rows use the same intervention (exactly the
single-adapter path: the intervention module called on the masked positions), and otherwise one
:class:`StackedEdit` per group of interventions sharing ``(variant, act, dropout, width)``: their
weights are stacked ``[A, r_max, d]`` (ranks zero-padded, which is exact) and one call of the
per-row op :func:`reft_kernels.ops.reft_edit_multi` edits every row with its own adapter. Gradients reach each
adapter's parameters only from its own rows (the stack is built from the parameters on every
forward that records gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from ..ops import reft_edit_multi

__all__ = ["CallPlan", "SingleEdit", "StackedEdit", "build_plan", "stack_weights"]


def _pad_rows(t: Optional[torch.Tensor], r_max: int, dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.to(dtype)
    if t.shape[0] == r_max:
        return t
    return torch.cat([t, t.new_zeros((r_max - t.shape[0], *t.shape[1:]))], dim=0)


def stack_weights(interventions) -> tuple:
    """``(proj, weight, bias, proj_bias, ranks)`` stacked ``[A, r_max, ...]``, ranks zero-padded.

    A slot whose intervention lacks c (NoReFT without bias) gets zeros there when others have it.
    """
    tensors = [iv.op_tensors() for iv in interventions]
    r_max = max(t[0].shape[0] for t in tensors)
    out = []
    for k in range(4):
        present = [t[k] for t in tensors if t[k] is not None]
        if not present:
            out.append(None)
            continue
        dtype = present[0].dtype
        for p in present[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        ref = present[0]
        out.append(torch.stack([
            _pad_rows(t[k] if t[k] is not None else ref.new_zeros(t[0].shape[0]), r_max, dtype) for t in tensors]))
    ranks = torch.tensor([t[0].shape[0] for t in tensors], device=out[0].device)
    return (*out, ranks)


@dataclass
class SingleEdit:
    """One intervention on the rows in ``rows`` ((B,) bool, None = all rows) at location ``location``."""

    intervention: object
    location: int
    seed_key: tuple
    rows: Optional[torch.Tensor] = None

    def apply(self, hidden, positions, *, seed, inplace, backend):
        """``hidden`` with the edit at ``positions`` (B, P) (already restricted to ``rows``)."""
        return self.intervention(hidden, positions=positions, inplace=inplace, backend=backend,
                                 seed=seed)   # via __call__: FSDP/ZeRO hooks run


@dataclass
class StackedEdit:
    """One per-row op call: row b uses ``interventions[stack_ids[b]]`` (-1: none) at location
    ``locations[b]``. The interventions share their width and ``op_settings()`` =
    ``(variant, act, dropout)`` (the plan groups them so); the settings are read from them when
    the edit runs, so ``generate`` (interventions in eval mode) applies no dropout. ``stack_ids``
    are indices into ``interventions``, not adapter names."""

    interventions: list
    stack_ids: torch.Tensor
    locations: torch.Tensor
    seed_key: tuple
    single_location: Optional[int] = None
    _cache: Optional[tuple] = field(default=None, repr=False)

    def weights(self) -> tuple:
        """The stacked weights; cached for the call when no gradient is recorded (generate)."""
        if torch.is_grad_enabled():
            return stack_weights(self.interventions)
        if self._cache is None:
            self._cache = stack_weights(self.interventions)
        return self._cache

    def apply(self, hidden, positions, *, seed, inplace, backend):
        """``hidden`` with each row's edit at ``positions`` (B, P): one call of the per-row op,
        made inside every stacked intervention's ``__call__`` (nested, in stack order), so their
        module hooks run around it as on the single path (FSDP/ZeRO gather the parameters)."""
        settings = {iv.op_settings() for iv in self.interventions}
        if len(settings) != 1:   # modes changed between planning and the call; the plan groups by them
            raise RuntimeError(f"stacked interventions now run with different (variant, act, dropout) "
                               f"{sorted(settings, key=str)}; keep every adapter's train/eval mode during a call")
        (variant, act, dropout), = settings

        def op(hidden):
            proj, weight, bias, proj_bias, ranks = self.weights()
            stack_ids = expand_rows(self.stack_ids, hidden.shape[0])
            return reft_edit_multi(hidden, positions, stack_ids, proj, weight, bias, proj_bias,
                                   variant=variant, act=act, dropout=dropout, seed=seed,
                                   inplace=inplace, ranks=ranks, backend=backend)
        for iv in reversed(self.interventions):
            op = partial(_call_within, iv, op)
        return op(hidden)


def _call_within(intervention, inner, hidden):
    return intervention(hidden, within=inner)


def expand_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row data for the call's batch (generate repeats each input row for beams/return sequences)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"the model was called with batch {batch} but adapters were given for {t.shape[0]} rows")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


def _signature(iv) -> tuple:
    return (*iv.op_settings(), iv.embed_dim)


def build_plan(chains: list, site_edits: dict, device) -> dict:
    """Per-site ordered edits for rows with adapter ``chains`` (see the module docstring).

    ``site_edits[name]`` lists adapter ``name``'s ``(site_key, intervention_index, module)`` in
    config order. Returns ``{site_key: [SingleEdit | StackedEdit, ...]}``.
    """
    B = len(chains)
    per_site: dict = {}
    for b, chain in enumerate(chains):
        lists: dict = {}
        for name in chain:
            for key, i, iv in site_edits[name]:
                lists.setdefault(key, []).append((name, i, iv))
        for key, entries in lists.items():
            per_site.setdefault(key, [[] for _ in range(B)])[b] = entries
    plan = {}
    for key, rows in per_site.items():
        steps = []
        for k in range(max(len(r) for r in rows)):
            stage = [r[k] if k < len(r) else None for r in rows]
            groups: dict = {}
            for b, entry in enumerate(stage):
                if entry is not None:
                    groups.setdefault(_signature(entry[2]), {}).setdefault((entry[0], entry[1]), []).append(b)
            for members in groups.values():
                steps.append(_edit_for(members, stage, B, device))
        plan[key] = steps
    return plan


def _edit_for(members: dict, stage: list, B: int, device):
    """A SingleEdit (one intervention in the stage group) or a StackedEdit (several)."""
    if len(members) == 1:
        (name, i), rows = next(iter(members.items()))
        iv = stage[rows[0]][2]
        mask = None
        if len(rows) != B:
            mask = torch.zeros(B, dtype=torch.bool)
            mask[rows] = True
            mask = mask.to(device)
        return SingleEdit(iv, i, (name, i), mask)
    slots = list(members)
    stack_ids = torch.full((B,), -1, dtype=torch.int64)
    locations = torch.zeros(B, dtype=torch.int64)
    ivs = []
    for a, slot in enumerate(slots):
        rows = members[slot]
        stack_ids[rows] = a
        locations[rows] = slot[1]
        ivs.append(stage[rows[0]][2])
    distinct = {slot[1] for slot in slots}
    single = distinct.pop() if len(distinct) == 1 else None
    return StackedEdit(ivs, stack_ids.to(device), locations.to(device), slots[0], single)


class CallPlan:
    """Everything the hooks apply during one ReftModel call: per site key the ordered ``edits``
    (:func:`build_plan`), each edit's dropout seed (``seeds``), the call's ``positions`` (an
    :class:`~reft_kernels.model.edit_state.EditState`) and the op ``backend``.

    :meth:`enter` sets the window-local positions of each model call (``local``); they stay set
    after the call returns, so gradient-checkpointing recomputation during backward re-applies
    exactly the same edits and dropout masks.
    """

    __slots__ = ("edits", "seeds", "positions", "backend", "local")

    def __init__(self, edits: dict, seeds: dict, positions, backend: str = "auto"):
        self.edits, self.seeds, self.positions, self.backend = edits, seeds, positions, backend
        self.local: Optional[list] = None

    def enter(self, batch: int, seq_len: int, offset, device) -> None:
        """A model call over ``seq_len`` tokens after ``offset`` cached ones begins."""
        self.local = self.positions.window(batch, seq_len, offset, device)

    def at(self, key) -> Optional[list]:
        """The edits of site ``key`` in the current model call (None: nothing to edit)."""
        return None if self.local is None else self.edits.get(key)

    def apply(self, steps: list, hidden: torch.Tensor, inplace: bool, path: str) -> torch.Tensor:
        """``hidden`` (B, T, d) at one site with its ``steps`` applied in order."""
        if hidden.dim() != 3:
            raise ValueError(f"the hidden states at {path!r} have shape {tuple(hidden.shape)}; ReFT edits "
                             "(batch, seq, hidden) tensors, so pick another component")
        for step in steps:
            positions = self._step_positions(step, hidden.shape[0])
            if positions is None:
                continue
            new = step.apply(hidden, positions, seed=self.seeds.get(step.seed_key, 0), inplace=inplace,
                             backend=self.backend)
            inplace = inplace or new is not hidden   # our own copy is fresh: edit it in place next
            hidden = new
        return hidden

    def _step_positions(self, step, batch: int) -> Optional[torch.Tensor]:
        local = self.local
        if isinstance(step, SingleEdit):
            pos = local[step.location]
            if pos is not None and step.rows is not None:
                pos = torch.where(expand_rows(step.rows, batch)[:, None], pos, torch.full_like(pos, -1))
            return pos
        if step.single_location is not None:
            return local[step.single_location]
        if any(p is None for p in local):
            return None
        width = max(p.shape[1] for p in local)
        padded = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in local])
        return padded[expand_rows(step.locations, batch), torch.arange(batch, device=padded.device)]
