"""The interventions: the six pyreft classes and the facts and math behind them.

* :mod:`.modules` -- the six classes; their names are attributes of this package too (loaded on
  first use), which makes it pyreft's ``pyreft.interventions``;
* :mod:`.registry` -- one record per class: every trait other modules derive from;
* :mod:`.rotation` -- the orthonormal R; :mod:`.householder` and :mod:`.completions` behind it;
* :mod:`.pyreft_keys` -- pyreft's state-dict keys <-> ours (the classes read pyreft state dicts).

``import reft_kernels.interventions.registry`` stays free of torch: nothing here loads eagerly.
"""
from importlib import import_module

# pyreft.interventions' names -> the submodule that defines them (PEP 562, loaded on first use)
_EXPORTS = {
    "ReftIntervention": "modules", "LoreftIntervention": "modules", "NoreftIntervention": "modules",
    "DireftIntervention": "modules", "NodireftIntervention": "modules",
    "ConsreftIntervention": "modules", "LobireftIntervention": "modules",
    "LowRankRotateLayer": "modules", "OrthonormalRotation": "rotation",
    "INTERVENTION_CLASSES": "modules", "intervention_class": "modules",
    "set_pyreft_base_default": "modules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
