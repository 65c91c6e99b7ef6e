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
per-row op :func:`reft_edit_multi` edits every row with its own adapter. Gradients reach each
adapter's parameters only from its own rows (the stack is built from the parameters on every
forward that records gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .ops import family

__all__ = ["SingleEdit", "StackedEdit", "build_plan", "reft_edit_multi", "reft_edit_multi_fallback",
           "stack_weights"]


def reft_edit_multi_fallback(hidden, positions, adapter_ids, proj, weight, bias, proj_bias=None, *,
                    variant="loreft", act=None, dropout=0.0, seed=None, inplace=False, ranks=None,
                    backend="auto"):
    """Per-row adapters (signature of ``reft_kernels.ops.reft_edit_multi``, docs/multi_adapter_op.md).

    Plain differentiable torch (autograd derives every gradient): the listed positions of row b
    get the family formula with adapter ``adapter_ids[b]``'s weights ``proj[a], weight[a],
    bias[a], proj_bias[a]``; rows with id -1 pass through. ``backend`` is accepted for the
    signature (this fallback is torch only); ``ranks`` is unused (the stack is rebuilt from the
    parameters on every training step, so padded rows never receive a gradient).
    """
    spec = family.VARIANTS[variant]
    B, T, d = hidden.shape
    ids = adapter_ids.to(device=hidden.device, dtype=torch.int64)
    if ids.shape != (B,):
        raise ValueError(f"adapter_ids has shape {tuple(ids.shape)}; pass one id per batch row ({B},)")
    A = proj.shape[0]
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= A):
        raise ValueError(f"adapter_ids holds {ids.tolist()}, outside [-1, {A}); use -1 for 'no adapter'")
    pos = torch.where(ids[:, None] >= 0, positions.to(torch.int64), torch.full_like(positions, -1, dtype=torch.int64))
    rows = family.canonical_rows(pos, T)
    rows = rows[rows >= 0]
    flat = hidden.reshape(B * T, d)
    if rows.numel() == 0:
        return hidden
    a = ids[rows // T]
    cd = family.compute_dtype(hidden)
    h = flat.index_select(0, rows).to(cd)
    P = proj.to(cd).index_select(0, a)                                     # (N, r, d)
    if spec.has_weight:
        z = torch.einsum("nrd,nd->nr", weight.to(cd).index_select(0, a), h) + bias.to(cd).index_select(0, a)
        s = family.activation(spec.act_name(act), z)
    else:
        s = bias.to(cd).index_select(0, a)
    if spec.subtract_proj:
        s = s - torch.einsum("nrd,nd->nr", P, h)
        if proj_bias is not None:
            s = s - proj_bias.to(cd).index_select(0, a)
    new = h + torch.einsum("nr,nrd->nd", s, P)
    if dropout:
        keep = family.dropout_keep_mask(int(seed or 0), rows, d, dropout)
        new = new * keep.to(cd) / (1.0 - dropout)
    new = new.to(hidden.dtype)
    if inplace:
        flat.index_put_((rows,), new)
        return hidden
    return flat.index_put((rows,), new).view(B, T, d)


try:   # the fused per-row op (torch/native/triton backends) where the ops package has it
    from .ops import reft_edit_multi
except ImportError:   # pragma: no cover - an ops package without it
    reft_edit_multi = reft_edit_multi_fallback


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


@dataclass
class StackedEdit:
    """One per-row op call: row b uses ``interventions[ids[b]]`` (-1: none) at location ``locations[b]``."""

    interventions: list
    ids: torch.Tensor
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


def _signature(iv) -> tuple:
    dropout = iv.dropout_p if iv.training else 0.0
    return (iv.variant, iv.act_fn, dropout, iv.embed_dim)


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
    ids = torch.full((B,), -1, dtype=torch.int64)
    locations = torch.zeros(B, dtype=torch.int64)
    ivs = []
    for a, slot in enumerate(slots):
        rows = members[slot]
        ids[rows] = a
        locations[rows] = slot[1]
        ivs.append(stage[rows[0]][2])
    distinct = {slot[1] for slot in slots}
    single = distinct.pop() if len(distinct) == 1 else None
    return StackedEdit(ivs, ids.to(device), locations.to(device), slots[0], single)
