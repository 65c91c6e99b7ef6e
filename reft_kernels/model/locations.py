"""Where one call edits: ``unit_locations`` (pyvene's lists) or ``intervention_locations`` (a
tensor) -> per-location positions.

Positions are token indices in the padded input; -1 means "no edit" (pyreft's sink token also
works); ``None`` (``unit_locations=None``) edits every position, as in pyvene. Lists are
validated on the host; tensors never leave the device (CUDA positions are range-checked with an
asynchronous device assert). See :mod:`reft_kernels.model.reft_model` for both conventions.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["call_positions", "input_shape"]


def input_shape(inputs: Mapping) -> tuple:
    """``(batch, seq_len, device)`` of the model inputs (input_ids or inputs_embeds)."""
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise ValueError("the model inputs need input_ids or inputs_embeds; got keys "
                         f"{sorted(inputs)}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"the model inputs are an empty batch (input shape {tuple(x.shape)}); pass at least one "
                         "row of shape (B, T)")
    return x.shape[0], x.shape[1], x.device


def _check_range(t: torch.Tensor, seq_len: int, name: str) -> None:
    """-1 <= t < seq_len; on the host for CPU tensors, as an async device assert otherwise."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        if lo < -1 or hi >= seq_len:
            raise ValueError(f"{name} contains {lo if lo < -1 else hi}, outside [-1, {seq_len}) for inputs of "
                             f"length {seq_len}; use token indices 0..{seq_len - 1} and -1 for 'no edit'")
    else:
        torch._assert_async(((t >= -1) & (t < seq_len)).all(), f"reft_kernels: {name} outside [-1, seq_len)")


def _rows_tensor(rows, i: int, batch: int, seq_len: int) -> torch.Tensor:
    """Intervention i's [batch][positions] list -> (B, P) int64 (ragged rows padded with -1)."""
    if len(rows) != batch:
        raise ValueError(f"unit_locations for intervention {i} has {len(rows)} rows but the batch has {batch}; "
                         "give one position list per batch row")
    rows = [r.tolist() if isinstance(r, torch.Tensor) else r for r in rows]
    width = max((len(r) for r in rows), default=0)
    out = torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows])
    if out.numel() and out.dtype != torch.int64:
        raise TypeError(f"unit_locations for intervention {i} holds {out.dtype} values; positions must be ints")
    bad = out[(out < -1) | (out >= seq_len)]
    if bad.numel():
        raise ValueError(f"unit_locations for intervention {i} contains {int(bad[0])}, outside [-1, {seq_len}) for "
                         f"inputs of length {seq_len}; use token indices 0..{seq_len - 1} and -1 for 'no edit'")
    return out.to(torch.int64)


def _depth(x) -> int:
    """Nesting depth of a location list; a tensor counts as its number of dimensions."""
    if isinstance(x, torch.Tensor):
        return x.dim()
    return 1 + _depth(x[0]) if isinstance(x, (list, tuple)) and len(x) else int(isinstance(x, (list, tuple)))


def _from_units(unit_locations, batch: int, seq_len: int, device, n: int, names):
    """pyvene ``unit_locations`` -> ([(B, P_i) tensor | None] per location, max position)."""
    if unit_locations is None:
        return [None] * n, None
    if not isinstance(unit_locations, Mapping) or not ({"sources->base", "base"} & set(unit_locations)):
        raise TypeError(f"unit_locations={unit_locations!r}: pass {{'sources->base': (None, LOCS)}} with "
                        "LOCS[intervention][batch_row] = [positions]")
    locs = unit_locations.get("sources->base", unit_locations.get("base"))
    if isinstance(locs, tuple) and len(locs) == 2:
        locs = locs[1]
    if isinstance(locs, torch.Tensor):
        if locs.dtype not in (torch.int32, torch.int64) or locs.dim() != 3 or tuple(locs.shape[:2]) != (n, batch):
            raise (ValueError if locs.dtype in (torch.int32, torch.int64) else TypeError)(
                f"a unit_locations tensor must be int32/int64 of shape (n_interventions, B, P) = ({n}, {batch}, P), "
                f"got {locs.dtype} {tuple(locs.shape)}")
        return _from_tensor(locs.transpose(0, 1), batch, seq_len, device, n, names, "unit_locations"), None
    if isinstance(locs, int):
        locs = [locs]
    if _depth(locs) == 1:
        locs = [[list(locs)] * batch] * n
    empty = next((i for i, r in enumerate(locs) if isinstance(r, (list, tuple)) and not len(r)), None)
    if empty is not None:
        raise ValueError(f"unit_locations for intervention {empty} has 0 rows but the batch has {batch}; give one "
                         "position list per batch row ([] for 'no edit' in that row)")
    if _depth(locs) != 3:
        raise ValueError("unit_locations must be nested as LOCS[intervention][batch_row] = [positions], "
                         f"an int, or a flat list of positions; got depth {_depth(locs)}")
    if len(locs) != n:
        raise ValueError(f"unit_locations has {len(locs)} intervention entries but the adapters of this call "
                         f"have {n} interventions ({names}); give one [batch][positions] "
                         "list per intervention")
    rows = [_rows_tensor(r, i, batch, seq_len) for i, r in enumerate(locs)]
    max_position = max((int(r.max()) for r in rows if r.numel()), default=-1)
    return [r.to(device, non_blocking=True) for r in rows], max_position

def _from_tensor(locs, batch: int, seq_len: int, device, n: int, names, name="intervention_locations"):
    """(B, n_interventions, P) integer tensor -> per-intervention (B, P) views, checked without sync."""
    if not isinstance(locs, torch.Tensor) or locs.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of shape (B, n_interventions={n}, P), "
                        f"got {type(locs).__name__} {getattr(locs, 'dtype', '')}")
    if locs.dim() != 3 or locs.shape[0] != batch or locs.shape[1] != n:
        raise ValueError(f"{name} has shape {tuple(locs.shape)} but must be (B, n_interventions, P) = "
                         f"({batch}, {n}, P) for this batch and its adapters ({names})")
    locs = locs.to(device, non_blocking=True)
    _check_range(locs, seq_len, name)
    return [locs[:, i] for i in range(n)]

def call_positions(inputs, unit_locations, intervention_locations, n: int, names=()) -> tuple:
    """``(positions, max_position)`` of one call: per location a (B, P) tensor of absolute token
    indices (-1 = none) or ``None`` (every position), from ``unit_locations`` or
    ``intervention_locations`` (see :mod:`reft_kernels.model.reft_model`); ``max_position`` is the
    largest listed position when the host knows it (lists), else ``None``. ``n``: how many
    locations the call's adapters take; ``names``: what they stand for, for messages."""
    batch, seq_len, device = input_shape(inputs)
    if intervention_locations is not None:
        if unit_locations is not None:
            raise ValueError("pass either unit_locations or intervention_locations, not both")
        return _from_tensor(intervention_locations, batch, seq_len, device, n, names), None
    return _from_units(unit_locations, batch, seq_len, device, n, names)
