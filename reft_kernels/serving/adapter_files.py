"""What the server knows about one adapter: where its weights are and how to place its edits.

An adapter is named by the user (``--adapter NAME=PATH`` or ``POST /v1/load_lora_adapter``). PATH is
what ``reft-kernels generate --adapter`` takes: the output directory of ``reft-kernels train`` /
``demo`` (with ``reft_run.json`` and an ``adapter/`` folder) or an adapter directory itself (then
``reft_run.json`` is looked up in its parent). ``reft_run.json`` records the position rule used in
training (``"l1"``, ``"f7+l7"``, ...), whether first/last positions share weights, the prompt template
and the base model. A prompt of length ``L`` is edited where :func:`prompt_locations` says, which is
exactly what ``reft-kernels generate`` does (``make_generation_inputs``), so the server and the CLI
give the same answer for the same prompt.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

from ..data.datasets import get_intervention_locations, parse_positions
from ..jobs.runs import RUN_INFO, read_run_info

__all__ = ["RUN_INFO", "AdapterSpec", "AdapterError", "read_adapter_spec", "prompt_locations"]

TEMPLATES = ("instruction", "chat", "none")


class AdapterError(ValueError):
    """An adapter that cannot be served as given (bad path, unknown positions, ...)."""


@dataclass
class AdapterSpec:
    """One servable adapter. ``positions`` is the training position rule; ``template`` the prompt
    template used in training (applied by chat requests when the tokenizer has no chat template)."""

    name: str
    path: str            # as given by the user
    adapter_dir: str     # the directory holding the checkpoint
    positions: str
    share_weights: bool
    template: str
    base_model: Optional[str]


def read_adapter_spec(name: str, path: str, default_positions: Optional[str] = None,
                      default_template: Optional[str] = None) -> AdapterSpec:
    """Resolve ``path`` like ``reft-kernels generate --adapter`` does; raise :class:`AdapterError`."""
    if not name or not isinstance(name, str):
        raise AdapterError(f"adapter name {name!r} must be a non-empty string")
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {name!r}: {path!r} is not a directory; pass the --output of "
                           "'reft-kernels train' / 'demo' or an adapter directory")
    try:
        info, run_dir = read_run_info(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:   # ValueError: not JSON
        raise AdapterError(f"adapter {name!r}: its {RUN_INFO} cannot be read: {exc}") from None
    if not isinstance(info, dict):
        raise AdapterError(f"adapter {name!r}: its {RUN_INFO} holds a JSON {type(info).__name__}, not an object "
                           "like {\"positions\": \"l1\", ...}; rewrite it as 'reft-kernels train' does")
    nested = os.path.join(run_dir, "adapter")
    adapter_dir = nested if os.path.isdir(nested) and os.path.abspath(path) == os.path.abspath(run_dir) else path
    positions = info.get("positions") or default_positions
    if positions is None:
        raise AdapterError(f"adapter {name!r}: {path!r} has no {RUN_INFO} recording its training positions; "
                           "start the server with --positions (e.g. --positions l1)")
    try:
        parse_positions(positions)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"adapter {name!r}: {exc}") from None
    template = default_template or info.get("template") or "instruction"
    if template not in TEMPLATES:
        raise AdapterError(f"adapter {name!r}: template {template!r} is not one of {TEMPLATES}")
    return AdapterSpec(name=name, path=path, adapter_dir=adapter_dir, positions=positions,
                       share_weights=bool(info.get("share_weights", False)), template=template,
                       base_model=info.get("model"))


def prompt_locations(prompt_len: int, positions: str, num_interventions: int, share_weights: bool,
                     pad: int = 0, num_slots: Optional[int] = None) -> List[List[int]]:
    """The edited token indices of a prompt of ``prompt_len`` tokens left-padded by ``pad``:
    one list per intervention (-1 = no edit), ``num_slots`` lists in all (extra ones all -1)."""
    locs = get_intervention_locations(last_position=prompt_len, positions=positions,
                                      num_interventions=num_interventions, share_weights=share_weights)
    locs = [[p + pad if p >= 0 else -1 for p in row] for row in locs]
    width = max((len(r) for r in locs), default=0)
    return locs + [[-1] * width] * ((num_slots or num_interventions) - num_interventions)
