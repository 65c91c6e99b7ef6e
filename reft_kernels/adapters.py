"""Named adapters on one ReftModel (PEFT-style): many adapters resident on one frozen base.

An *adapter* is one :class:`~reft_kernels.config.ReftConfig` with its intervention modules. The
config a ReftModel is built with is the adapter ``"default"``; more are added with
:meth:`AdapterMixin.add_adapter` / :meth:`AdapterMixin.load_adapter` (our checkpoints and
pyreft's). Nothing of the base model is copied: an adapter is only its interventions (kilobytes),
and switching adapters only changes which edits the hooks apply.

Which adapters edit which rows:

* ``set_adapter("a")`` / ``set_adapter(["a", "b"])`` picks the adapters applied to every row; a
  list composes them in that order (``Phi_b o Phi_a`` where they share a site, see
  :mod:`reft_kernels.adapter_plan`);
* ``adapter_ids=[...]`` on ``forward``/``generate`` overrides that per row: one entry per input
  row, each a name, an int (an index into :attr:`AdapterMixin.adapter_names`), a list of
  them (a composition for that row), or ``None``/``-1`` (no adapter: the row runs the base model);
* inside ``with model.disable_adapter():`` nothing is edited.

Adapters on one call share its positions: intervention i of every adapter uses location i of
``unit_locations`` (LOCS[i][row]) or ``intervention_locations[:, i]``, so the call gives as many
locations as the adapter with the most interventions has (an int / flat list / ``None``
broadcasts to all).

The first registered adapter is the *primary* one: it lives in ``reft_model.interventions`` and
``reft_model.config`` (so a single-adapter ReftModel has exactly its former attributes,
``state_dict`` keys and checkpoint files); the others live in ``reft_model.extra_adapters``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn

from .adapter_plan import build_plan
from .config import ReftConfig
from .ops.variants import new_seed
from .families import resolve_site

__all__ = ["AdapterMixin", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER = "default"


class _AdapterView:
    """One adapter seen as a single-adapter ReftModel by the checkpoint writers."""

    def __init__(self, owner, name):
        self.config = owner._adapter_configs[name]
        self.interventions = owner.adapter_interventions(name)
        self.model = owner.model


class AdapterMixin:
    """The adapter registry of :class:`~reft_kernels.reft_model.ReftModel` (see the module docstring)."""

    def _init_adapters(self, interventions: nn.ModuleDict, sites: list) -> None:
        self.extra_adapters = nn.ModuleDict()
        self._adapter_configs = {DEFAULT_ADAPTER: self.config}
        self._adapter_sites = {DEFAULT_ADAPTER: sites}
        self._primary: Optional[str] = DEFAULT_ADAPTER
        self._active = [DEFAULT_ADAPTER]
        self._disabled = False
        self._version = 0
        self._plan_cache: dict = {}
        self._patch.sync(sites)

    # -- registry -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list:
        """Every adapter's name, in registration order (``adapter_ids`` ints index this list)."""
        return list(self._adapter_configs)

    @property
    def active_adapters(self) -> list:
        """The adapters applied to every row when ``adapter_ids`` is not given, in order."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """PEFT's single name (the first active adapter)."""
        if not self._active:
            raise ValueError("no adapter is active; call set_adapter(name)")
        return self._active[0]

    @property
    def _sites(self) -> list:
        """The primary adapter's sites, in config order (one per intervention)."""
        return self._adapter_sites.get(self._primary, [])

    def adapter_interventions(self, name: str) -> nn.ModuleDict:
        """Adapter ``name``'s intervention modules, keyed like ``reft_model.interventions``."""
        self._check_name(name)
        return self.interventions if name == self._primary else self.extra_adapters[name]

    def adapter_config(self, name: str) -> ReftConfig:
        self._check_name(name)
        return self._adapter_configs[name]

    def _check_name(self, name) -> None:
        if name not in self._adapter_configs:
            raise ValueError(f"adapter {name!r} is unknown; loaded adapters: {self.adapter_names}")

    def add_adapter(self, adapter_name: str, config: ReftConfig) -> None:
        """Build a new adapter from ``config`` (as ``get_reft_model`` does) next to the others.

        Its interventions go to the model's device and start in training mode (like a new
        ReftModel's); the active adapters are unchanged (``set_adapter`` to use it).
        """
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty str without '.'")
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists; delete_adapter({adapter_name!r}) "
                             "first or pick another name")
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a ReftConfig, got {type(config).__name__}")
        self._check_live(None, None)
        sites = [resolve_site(self.model, rep.layer, rep.component) for rep in config.representations]
        width = self._hidden_width()
        modules = nn.ModuleDict({key: self._build(rep, width) for key, rep in zip(config.keys, config.representations)})
        self._register(adapter_name, config, modules, sites)
        self._move_to_sites(adapter_name)

    def _register(self, name, config, modules, sites) -> None:
        if self._primary is None:
            self._primary, self.config, self.interventions = name, config, modules
        else:
            self.extra_adapters[name] = modules
        self._adapter_configs[name] = config
        self._adapter_sites[name] = sites
        self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._plan_cache.clear()
        self._patch.sync([s for sites in self._adapter_sites.values() for s in sites])

    def load_adapter(self, path, adapter_name: str = DEFAULT_ADAPTER, *, config=None, dtype=None,
                     is_trainable: bool = False) -> None:
        """Load a checkpoint (ours or pyreft's, see :mod:`reft_kernels.checkpoint`) as adapter
        ``adapter_name``. ``config``/``dtype`` as for ``ReftModel.load``. The adapter is in eval
        mode unless ``is_trainable``. Base-model weights in the checkpoint are not loaded (all
        adapters share the frozen base). Everything is validated before anything changes."""
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists; delete_adapter({adapter_name!r}) "
                             "first or pick another name")
        from .checkpoint import read_for_model
        loaded_config = read_for_model(path, self.model, config, dtype=dtype).config   # the model is not touched
        modules = nn.ModuleDict({key: rep.intervention for key, rep in
                                 zip(loaded_config.keys, loaded_config.representations)})
        modules.train(is_trainable)
        if not is_trainable:
            modules.requires_grad_(False)
        self.add_loaded(adapter_name, loaded_config, modules)

    def add_loaded(self, adapter_name: str, config: ReftConfig, modules: nn.ModuleDict) -> None:
        """Register already-built interventions (keyed as ``config.keys``) as adapter ``adapter_name``."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty str without '.'")
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists")
        sites = [resolve_site(self.model, rep.layer, rep.component) for rep in config.representations]
        self._register(adapter_name, config, modules, sites)

    def set_adapter(self, adapter_name) -> None:
        """Apply ``adapter_name`` (a name, or a list composed in order) to every row by default."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapter({names}) lists an adapter twice; list each adapter once")
        self._active = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (its modules and, if no other adapter uses them, its hooks)."""
        self._check_name(adapter_name)
        if adapter_name == self._primary:
            rest = [n for n in self._adapter_configs if n != adapter_name]
            self._primary = rest[0] if rest else None
            self.interventions = self.extra_adapters.pop(rest[0]) if rest else nn.ModuleDict()
            self.config = self._adapter_configs[rest[0]] if rest else ReftConfig(representations=[])
        else:
            del self.extra_adapters[adapter_name]
        del self._adapter_configs[adapter_name], self._adapter_sites[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]
        self._changed()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block every call runs the base model (no adapter edits anything)."""
        before, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = before

    def save_adapter(self, save_directory, adapter_name: str, **kwargs) -> str:
        """Write adapter ``adapter_name`` alone as a checkpoint (the same files as a
        single-adapter ReftModel with that config writes)."""
        from .checkpoint import save_reft_model
        self._check_name(adapter_name)
        return save_reft_model(_AdapterView(self, adapter_name), save_directory, **kwargs)

    def all_adapter_modules(self) -> list:
        return [self.adapter_interventions(n) for n in self._adapter_configs]

    def _move_to_sites(self, name: str) -> None:
        for iv, site in zip(self.adapter_interventions(name).values(), self._adapter_sites[name]):
            tensor = next(site.module.parameters(), None)
            iv.to(tensor.device if tensor is not None else self._model_device())

    # -- per-call plan --------------------------------------------------------------------------
    def _row_chains(self, adapter_ids, batch: int) -> list:
        """Each input row's adapter chain (see the module docstring)."""
        if self._disabled:
            return [[] for _ in range(batch)]
        if adapter_ids is None:
            return [list(self._active) for _ in range(batch)]
        if hasattr(adapter_ids, "tolist"):
            adapter_ids = adapter_ids.tolist()
        if isinstance(adapter_ids, (str, int)) or len(adapter_ids) != batch:
            raise ValueError(f"adapter_ids={adapter_ids!r} must list one entry per input row ({batch} rows): "
                             "a name, an index into adapter_names, a list of them, or None for no adapter")
        return [self._chain(entry) for entry in adapter_ids]

    def _chain(self, entry) -> list:
        if entry is None or entry == -1:
            return []
        entries = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        names = self.adapter_names
        chain = []
        for e in entries:
            if isinstance(e, int) and not isinstance(e, bool):
                if not 0 <= e < len(names):
                    raise ValueError(f"adapter_ids entry {e} is out of range for {len(names)} adapters "
                                     f"{names}; use 0..{len(names) - 1}, a name, or -1/None for no adapter")
                e = names[e]
            self._check_name(e)
            chain.append(e)
        return chain

    def _location_count(self, chains: list) -> int:
        used = {name for chain in chains for name in chain}
        return max((len(self._adapter_configs[n].representations) for n in used), default=0)

    def _edit_plan(self, chains: list, device) -> tuple:
        """(plan, seeds) for a call; uniform calls (every row the same chain) reuse a cached plan."""
        uniform = all(c == chains[0] for c in chains)
        key = (tuple(chains[0]), str(device)) if uniform else None
        plan = self._plan_cache.get(key) if uniform else None
        used = list(chains[0]) if uniform else list(dict.fromkeys(n for c in chains for n in c))
        site_edits = {n: [(self._patch.site_key(s), i, iv) for i, (s, iv) in enumerate(
            zip(self._adapter_sites[n], self.adapter_interventions(n).values()))] for n in used}
        if plan is None:
            plan = build_plan(chains[:1] if uniform else chains, site_edits, device)
            if uniform:
                self._plan_cache[key] = plan
        seeds = {(n, i): new_seed() if iv.training and iv.dropout_p else 0
                 for n in used for _, i, iv in site_edits[n]}
        return plan, seeds
