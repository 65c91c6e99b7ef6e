"""Named adapters on one ReftModel (PEFT-style): many adapters resident on one frozen base.

An *adapter* is one :class:`~reft_kernels.model.config.ReftConfig` with its intervention modules. The
config a ReftModel is built with is the adapter ``"default"``; more are added with
:meth:`ReftModel.add_adapter` / :meth:`ReftModel.load_adapter` (our checkpoints and
pyreft's). Nothing of the base model is copied: an adapter is only its interventions (kilobytes),
and switching adapters only changes which edits the hooks apply.

Which adapters edit which rows:

* ``set_adapter("a")`` / ``set_adapter(["a", "b"])`` picks the adapters applied to every row; a
  list composes them in that order (``Phi_b o Phi_a`` where they share a site, see
  :mod:`reft_kernels.model.plan`);
* ``adapter_ids=[...]`` on ``forward``/``generate`` overrides that per row: one entry per input
  row, each a name, an int (an index into :attr:`ReftModel.adapter_names`), a list of
  them (a composition for that row), or ``None``/``-1`` (no adapter: the row runs the base model);
* inside ``with model.disable_adapter():`` nothing is edited.

Adapters on one call share its positions: intervention i of every adapter uses location i of
``unit_locations`` (LOCS[i][row]) or ``intervention_locations[:, i]``, so the call gives as many
locations as the adapter with the most interventions has (an int / flat list / ``None``
broadcasts to all).

The first registered adapter is the *primary* one: it lives in ``reft_model.interventions`` and
``reft_model.config`` (so a single-adapter ReftModel has exactly its former attributes,
``state_dict`` keys and checkpoint files); the others live in ``reft_model.extra_adapters``.

:class:`AdapterRegistry` holds all of this; a ReftModel holds one as ``reft_model.adapters`` and
its adapter methods (``add_adapter``, ``set_adapter``, ...) call it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .plan import build_plan
from .config import ReftConfig
from ..families import hidden_size, resolve_site
from ..interventions.modules import ReftIntervention, intervention_class
from ..ops.variants import new_seed
from .patcher import ModelPatch

__all__ = ["AdapterRegistry", "DEFAULT_ADAPTER", "build_intervention"]

DEFAULT_ADAPTER = "default"


def build_intervention(rep, width: Optional[int]) -> ReftIntervention:
    """The representation's intervention (built from its type and kwargs unless given), checked
    against the model's hidden ``width`` where the component is an abstract one."""
    abstract = "." not in rep.component
    if rep.intervention is not None:
        iv = rep.intervention
    else:
        kwargs = {"embed_dim": width, **rep.kwargs()}
        if kwargs["embed_dim"] is None:
            raise ValueError(f"embed_dim is unknown for component {rep.component!r}; put it in the "
                             "representation's intervention_kwargs or pass a built intervention")
        iv = intervention_class(rep.intervention_type)(**kwargs)
    if abstract and width is not None and iv.embed_dim != width:
        raise ValueError(f"intervention for {rep.component!r} (layer {rep.layer}) has embed_dim={iv.embed_dim} "
                         f"but the model's hidden size is {width}; build it with embed_dim={width}")
    return iv


def _check_new_name(name, known) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r} must be a non-empty str without '.'")
    if name in known:
        raise ValueError(f"an adapter named {name!r} exists; delete_adapter({name!r}) first or pick another name")


class _AdapterView:
    """One adapter seen as a single-adapter ReftModel by the checkpoint writers."""

    def __init__(self, registry, name):
        self.config = registry.configs[name]
        self.interventions = registry.modules(name)
        self.model = registry.model


class AdapterRegistry:
    """The named adapters of one ReftModel (see the module docstring).

    Its whole interface to the ReftModel that holds it: the base ``model`` (sites, hidden width,
    checkpoint reads), the two module containers it fills (``primary`` is
    ``reft_model.interventions``, ``extra`` is ``reft_model.extra_adapters``, so ``state_dict``
    keys are the host's) and ``on_sites``, called with every adapter's sites whenever they change
    (the patch hooks exactly those). ``configs`` / ``sites`` map each name to its config and its
    resolved sites (one per intervention, config order); ``active`` is the default chain.
    """

    def __init__(self, model: nn.Module, primary: nn.ModuleDict, extra: nn.ModuleDict,
                 on_sites: Callable[[list], None]):
        self.model, self.primary_modules, self.extra, self.on_sites = model, primary, extra, on_sites
        self.configs: dict = {}
        self.sites: dict = {}
        self.primary: Optional[str] = None
        self.active: list = []
        self.disabled = False
        self._plans: dict = {}

    @property
    def names(self) -> list:
        return list(self.configs)

    @property
    def primary_config(self) -> ReftConfig:
        return self.configs[self.primary] if self.primary is not None else ReftConfig(representations=[])

    def check(self, name) -> None:
        if name not in self.configs:
            raise ValueError(f"adapter {name!r} is unknown; loaded adapters: {self.names}")

    def modules(self, name: str) -> nn.ModuleDict:
        """Adapter ``name``'s intervention modules, keyed like its config."""
        self.check(name)
        return self.primary_modules if name == self.primary else self.extra[name]

    def all_modules(self) -> list:
        return [self.modules(n) for n in self.configs]

    def all_sites(self) -> list:
        return [s for sites in self.sites.values() for s in sites]

    # -- changes --------------------------------------------------------------------------------
    def build(self, name: str, config: ReftConfig) -> None:
        """Add adapter ``name`` built from ``config`` (as ``get_reft_model`` does); its modules
        stay where they are built (see :meth:`move_to_sites`)."""
        _check_new_name(name, self.configs)
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a ReftConfig, got {type(config).__name__}")
        sites = self._resolve(config)
        width = hidden_size(self.model)
        modules = nn.ModuleDict({key: build_intervention(rep, width)
                                 for key, rep in zip(config.keys, config.representations)})
        self._register(name, config, modules, sites)

    def add(self, name: str, config: ReftConfig, modules: nn.ModuleDict) -> None:
        """Register already-built interventions (keyed as ``config.keys``) as adapter ``name``."""
        _check_new_name(name, self.configs)
        self._register(name, config, modules, self._resolve(config))

    def load(self, path, name: str, *, config=None, dtype=None, is_trainable: bool = False) -> None:
        """Load a checkpoint as adapter ``name`` (see ``ReftModel.load_adapter``)."""
        _check_new_name(name, self.configs)
        from ..checkpoint import read_for_model
        loaded = read_for_model(path, self.model, config, dtype=dtype).config   # the model is not touched
        modules = nn.ModuleDict({key: rep.intervention for key, rep in zip(loaded.keys, loaded.representations)})
        modules.train(is_trainable)
        if not is_trainable:
            modules.requires_grad_(False)
        self.add(name, loaded, modules)

    def _resolve(self, config) -> list:
        return [resolve_site(self.model, rep.layer, rep.component) for rep in config.representations]

    def _register(self, name, config, modules, sites) -> None:
        if self.primary is None:
            self.primary = name
            self.primary_modules.update(modules)
        else:
            self.extra[name] = modules
        self.configs[name], self.sites[name] = config, sites
        self._changed()

    def delete(self, name: str) -> None:
        self.check(name)
        if name == self.primary:   # the next adapter becomes the primary one (its modules move in)
            self.primary_modules.clear()
            rest = [n for n in self.configs if n != name]
            self.primary = rest[0] if rest else None
            if rest:
                self.primary_modules.update(self.extra.pop(rest[0]))
        else:
            del self.extra[name]
        del self.configs[name], self.sites[name]
        self.active = [n for n in self.active if n != name]
        self._changed()

    def _changed(self) -> None:
        self._plans.clear()
        self.on_sites(self.all_sites())

    def set_active(self, adapter_name) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self.check(name)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapter({names}) lists an adapter twice; list each adapter once")
        self.active = names

    def move_to_sites(self, name: str) -> None:
        """Each of the adapter's interventions to the device of the module it edits."""
        fallback = next(self.model.parameters(), None)
        for iv, site in zip(self.modules(name).values(), self.sites[name]):
            tensor = next(site.module.parameters(), fallback)
            iv.to(tensor.device if tensor is not None else torch.device("cpu"))

    def save(self, name: str, save_directory, **kwargs) -> str:
        """Write adapter ``name`` alone (the files a single-adapter ReftModel with its config writes)."""
        from ..checkpoint import save_reft_model
        self.check(name)
        return save_reft_model(_AdapterView(self, name), save_directory, **kwargs)

    # -- per-call plan --------------------------------------------------------------------------
    def row_chains(self, adapter_ids, batch: int) -> list:
        """Each input row's adapter chain from the user's ``adapter_ids`` (see the module docstring)."""
        if self.disabled:
            return [[] for _ in range(batch)]
        if adapter_ids is None:
            return [list(self.active) for _ in range(batch)]
        if hasattr(adapter_ids, "tolist"):
            adapter_ids = adapter_ids.tolist()
        if isinstance(adapter_ids, (str, int)) or len(adapter_ids) != batch:
            raise ValueError(f"adapter_ids={adapter_ids!r} must list one entry per input row ({batch} rows): "
                             "a name, an index into adapter_names, a list of them, or None for no adapter")
        return [self._chain(entry) for entry in adapter_ids]

    def _chain(self, entry) -> list:
        if entry is None or entry == -1:
            return []
        names, chain = self.names, []
        for e in (list(entry) if isinstance(entry, (list, tuple)) else [entry]):
            if isinstance(e, int) and not isinstance(e, bool):
                if not 0 <= e < len(names):
                    raise ValueError(f"adapter_ids entry {e} is out of range for {len(names)} adapters "
                                     f"{names}; use 0..{len(names) - 1}, a name, or -1/None for no adapter")
                e = names[e]
            self.check(e)
            chain.append(e)
        return chain

    def location_count(self, chains: list) -> int:
        """How many locations a call with these chains takes (the most interventions of one adapter)."""
        used = {name for chain in chains for name in chain}
        return max((len(self.configs[n].representations) for n in used), default=0)

    def location_names(self) -> list:
        """What the locations of a call with the default chain stand for (for messages)."""
        return list(self.primary_modules) if self.active == [self.primary] else self.names

    def site_edits(self, chains: list, device) -> tuple:
        """``(edits, seeds)`` for a call: per site key the ordered edits (see
        :func:`reft_kernels.model.plan.build_plan`), per edit its dropout seed. Uniform calls
        (every row the same chain) reuse a cached plan."""
        uniform = all(c == chains[0] for c in chains)
        key = (tuple(chains[0]), str(device)) if uniform else None
        edits = self._plans.get(key) if uniform else None
        used = list(chains[0]) if uniform else list(dict.fromkeys(n for c in chains for n in c))
        per_adapter = {n: [(ModelPatch.site_key(s), i, iv) for i, (s, iv) in enumerate(
            zip(self.sites[n], self.modules(n).values()))] for n in used}
        if edits is None:
            edits = build_plan(chains[:1] if uniform else chains, per_adapter, device)
            if uniform:
                self._plans[key] = edits
        seeds = {(n, i): new_seed() if iv.training and iv.dropout_p else 0
                 for n in used for _, i, iv in per_adapter[n]}
        return edits, seeds
