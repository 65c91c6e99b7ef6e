"""The adapters one vLLM worker holds, stacked per layer for the per-row op.

An adapter is a checkpoint directory in our format or pyreft's, read by the same reader as
``ReftModel.load`` (:func:`reft_kernels.checkpoint.api.read_for_model`), plus its position rule
(``"l1"``, ``"f3+l3"``, ... from ``reft_run.json`` or given at load time) and ``share_weights``.

The reader checks a checkpoint against a model. vLLM's model is not a transformers model, so it is
checked against a *skeleton*: an empty ``nn.Module`` tree with the block list where
:data:`reft_kernels.families.FAMILIES` says the family keeps it, the HF config vLLM loaded, and one
empty parameter giving the device and dtype. Nothing model-specific is written here.

Stacking. Intervention ``i`` of adapter ``a`` sits at layer ``l_i`` (component ``block_output``) and
is the ``k``-th of ``a``'s interventions at that layer (``k`` = its *stage*, config order: pyreft
applies interventions sharing a site in that order). Entries with the same ``(layer, stage)`` and
the same op signature ``(variant, act, width)`` form one :class:`StackGroup`: their weights are
stacked ``[A, r_max, d]`` (ranks zero-padded, exact) and one call of the per-row op edits every
selected token with its own slot. Groups are rebuilt on every load and unload.

Position rule of intervention ``i`` for a prompt of ``L`` tokens (pyreft's, as
:func:`reft_kernels.data.positions.get_intervention_locations`): with ``f = min(L // 2, first_n)``
and ``l = min(L // 2, last_n)``, token position ``p`` is edited when ``p < f`` (kind ``"first"``),
``L - l <= p < L`` (kind ``"last"``) or either (kind ``"both"``). Untied ``fN+lM`` adapters
(``share_weights=False``, both N and M > 0) give the first half of their interventions kind
``"first"`` and the second half ``"last"``; all others are ``"both"``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["AdapterStore", "AdapterEntry", "StackGroup", "LoadedAdapter", "skeleton_for"]

SUPPORTED_COMPONENTS = ("block_output",)


@dataclass(frozen=True)
class AdapterEntry:
    """One intervention of one adapter: where it edits and which stack slot holds its weights."""

    layer: int
    stage: int
    kind: str            # "first" | "last" | "both"
    group: Tuple         # key of its StackGroup in the store
    slot: int            # its index in that group's stack


@dataclass
class LoadedAdapter:
    name: str
    path: str
    positions: str
    first_n: int
    last_n: int
    share_weights: bool
    interventions: list          # the ReftIntervention modules, config order
    layers: List[int]
    kinds: List[str]
    entries: List[AdapterEntry]


@dataclass
class StackGroup:
    """Stacked weights of the entries sharing (layer, stage, variant, act, width)."""

    layer: int
    stage: int
    variant: str
    act: Optional[str]
    proj: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: torch.Tensor
    proj_bias: Optional[torch.Tensor]


def skeleton_for(hf_config, dtype: torch.dtype, device) -> nn.Module:
    """An empty module tree shaped like the HF model of ``hf_config`` for the checkpoint reader."""
    from ..families import FAMILIES
    family = FAMILIES.get(getattr(hf_config, "model_type", None))
    if family is None:
        raise ValueError(f"reft_kernels has no family entry for model_type={hf_config.model_type!r}; "
                         f"the vLLM plugin supports {sorted(FAMILIES)}")
    arch = (getattr(hf_config, "architectures", None) or ["Module"])[0]
    root = type(arch, (nn.Module,), {})()     # named as the HF class, which the reader compares
    root.config = hf_config
    root.register_parameter("anchor", nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))

    def block() -> nn.Module:
        b = nn.Module()
        for suffix, _kind in family.components.values():
            node = b
            for part in [p for p in suffix.split(".") if p]:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
        return b

    parent, *path = family.blocks.split(".")[::-1]   # e.g. "layers" or "encoder.layer"
    node = root
    for part in reversed(path):
        node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(parent, nn.ModuleList(block() for _ in range(hf_config.num_hidden_layers)))
    return root


def _kinds(n: int, first_n: int, last_n: int, share_weights: bool, where: str) -> List[str]:
    if share_weights or first_n == 0 or last_n == 0:
        return ["both"] * n
    if n % 2:
        raise ValueError(f"{where}: untied 'f+l' positions need an even number of interventions "
                         f"(first half: first positions, second half: last), found {n}")
    return ["first"] * (n // 2) + ["last"] * (n // 2)


class AdapterStore:
    """Named adapters of one worker, stacked per (layer, stage, op signature); see the module doc."""

    def __init__(self, hf_config, dtype: torch.dtype, device, num_layers: int):
        self.hf_config = hf_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = num_layers
        self.adapters: Dict[str, LoadedAdapter] = {}
        self.groups: Dict[Tuple, StackGroup] = {}
        self.lock = threading.Lock()
        self.version = 0                  # bumped on every change
        self.refusal: Optional[str] = None   # set when this engine cannot run adapters (see model.py)

    def load(self, name: str, path: str, positions: Optional[str] = None,
             share_weights: Optional[bool] = None) -> LoadedAdapter:
        """Read ``path`` (ours or pyreft's) and add it under ``name``; nothing changes on error."""
        from ..checkpoint.api import read_for_model
        from ..data.positions import parse_positions
        from ..artifacts import locate_adapter
        if self.refusal:
            raise RuntimeError(self.refusal)
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        if os.path.isdir(path):
            info, adapter_dir = locate_adapter(path, f"adapter {name!r}")
        else:   # a Hub repo id (read_for_model downloads it), or a missing path (read_for_model says so)
            info, adapter_dir = {}, path
        positions = positions or info.get("positions")
        if positions is None:
            raise ValueError(f"adapter {name!r}: {path!r} has no reft_run.json recording its training positions; "
                             "pass positions (e.g. 'l1') when loading it")
        first_n, last_n = parse_positions(positions)
        share = bool(info.get("share_weights", False)) if share_weights is None else bool(share_weights)
        loaded = read_for_model(adapter_dir, skeleton_for(self.hf_config, self.dtype, self.device))
        reps = loaded.config.representations
        for rep in reps:
            if rep.component not in SUPPORTED_COMPONENTS:
                raise ValueError(f"adapter {name!r}: component {rep.component!r} at layer {rep.layer} is not "
                                 f"supported on vLLM; the plugin edits {SUPPORTED_COMPONENTS} "
                                 "(the decoder layer's output)")
            if not 0 <= int(rep.layer) < self.num_layers:
                raise ValueError(f"adapter {name!r}: layer {rep.layer} is outside this model's 0..{self.num_layers - 1}")
        ivs = [rep.intervention.eval().requires_grad_(False) for rep in reps]
        kinds = _kinds(len(ivs), first_n, last_n, share, f"adapter {name!r}")
        adapter = LoadedAdapter(name, path, positions, first_n, last_n, share, ivs,
                                [int(r.layer) for r in reps], kinds, [])
        with self.lock:
            self.adapters[name] = adapter
            self._restack()
        return adapter

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded: {sorted(self.adapters)}")
            del self.adapters[name]
            self._restack()

    def _restack(self) -> None:
        from ..model.plan import stack_weights
        members: Dict[Tuple, list] = {}
        for adapter in self.adapters.values():
            seen: Dict[int, int] = {}
            adapter.entries = []
            for iv, layer, kind in zip(adapter.interventions, adapter.layers, adapter.kinds):
                stage = seen.get(layer, 0)
                seen[layer] = stage + 1
                key = (layer, stage, iv.variant, iv.act_fn, iv.embed_dim)
                members.setdefault(key, []).append(iv)
                adapter.entries.append(AdapterEntry(layer, stage, kind, key, len(members[key]) - 1))
        groups = {}
        for key, ivs in members.items():
            proj, weight, bias, proj_bias, _ranks = stack_weights(ivs)
            move = lambda t: None if t is None else t.detach().to(self.device)  # noqa: E731
            groups[key] = StackGroup(key[0], key[1], key[2], key[3], move(proj), move(weight), move(bias),
                                     move(proj_bias))
        self.groups = groups
        self.version += 1
