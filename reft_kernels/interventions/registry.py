"""The intervention-type registry: one record per intervention class, every trait in one place.

Every module that needs a fact about an intervention class reads it here: the modules
(:mod:`reft_kernels.interventions.modules`), the checkpoint formats (:mod:`reft_kernels.checkpoint`),
pyreft's state-dict keys (:mod:`reft_kernels.interventions.pyreft_keys`), the CLI (``--intervention``) and
the config (:mod:`reft_kernels.model.config`). Adding an intervention class is one :func:`register`
call (its record) plus its math: an op variant in :mod:`reft_kernels.ops.variants` (or an
existing one) and the module class.

A record's traits, and what follows from them:

* ``name``: the class name (pyreft 0.1.0's for the six pyreft classes), as checkpoints and
  pyvene's ``str(type(iv))`` write it; ``cli_name`` the ``--intervention`` choice;
* ``variant``: the op variant (a key of :data:`reft_kernels.ops.variants.VARIANTS`);
* ``rotated``: P is an orthonormal rotation R, ``rotate_layer`` (tensor ``rotate_layer.weight``,
  (r, d) fp32); otherwise a free projection ``proj_layer`` (``proj_layer.weight[/bias]``);
* ``vector_source``: ``learned_source`` is an (r,) vector b (no W); otherwise an
  ``nn.Linear(d, r)`` (``learned_source.weight``/``.bias``);
* ``pyreft_slim``: pyreft saves the class with LoReFT's slim state dict
  ``{weight, bias, rotate_layer}`` instead of ``nn.Module.state_dict``.

Also here: pyvene's representation fields and its intervention keys, both generations
(:func:`intervention_key`).
"""
from __future__ import annotations

import re
from collections.abc import Set
from dataclasses import dataclass
from typing import Dict, Iterator, List

__all__ = ["InterventionType", "TYPES", "register", "lookup", "type_name", "cli_choices",
           "names_where", "REPRESENTATION_FIELDS", "intervention_key", "representation_keys"]


@dataclass(frozen=True)
class InterventionType:
    """Everything the package knows about one intervention class (see the module docstring)."""

    name: str
    cli_name: str
    variant: str
    rotated: bool
    vector_source: bool
    pyreft_slim: bool = False

    @property
    def projected(self) -> bool:
        """P is a free projection (``proj_layer``), not a rotation."""
        return not self.rotated

    @property
    def projection_tensor(self) -> str:
        """The canonical tensor holding P (r, d)."""
        return "rotate_layer.weight" if self.rotated else "proj_layer.weight"

    def required_tensors(self) -> List[str]:
        """The canonical tensors every checkpoint of this class holds."""
        source = ["learned_source"] if self.vector_source else ["learned_source.weight",
                                                                "learned_source.bias"]
        return [self.projection_tensor] + source


TYPES: Dict[str, InterventionType] = {}


def register(record: InterventionType) -> InterventionType:
    """Add ``record`` (its name and CLI name must be new); returns it."""
    if record.name in TYPES or any(t.cli_name == record.cli_name for t in TYPES.values()):
        raise ValueError(f"intervention type {record.name!r} / {record.cli_name!r} is already registered")
    TYPES[record.name] = record
    return record


for _record in (
    InterventionType("LoreftIntervention", "loreft", "loreft", rotated=True, vector_source=False,
                     pyreft_slim=True),
    InterventionType("NoreftIntervention", "noreft", "noreft", rotated=False, vector_source=False),
    InterventionType("ConsreftIntervention", "consreft", "consreft", rotated=True, vector_source=True),
    InterventionType("LobireftIntervention", "lobireft", "lobireft", rotated=True, vector_source=True),
    InterventionType("DireftIntervention", "direft", "direft", rotated=True, vector_source=False),
    InterventionType("NodireftIntervention", "nodireft", "nodireft", rotated=False, vector_source=False),
):
    register(_record)


def type_name(obj) -> str:
    """The registered class name of an intervention object, class, class name or pyvene type
    string (``"<class 'pyreft.interventions.LoreftIntervention'>"``); a subclass of a registered
    class counts as that class. Raises ValueError naming the registered ones."""
    if isinstance(obj, str):
        words = re.findall(r"[A-Za-z_]\w*", obj)
        name = words[-1] if words else ""
    else:
        cls = obj if isinstance(obj, type) else type(obj)
        name = next((c.__name__ for c in cls.__mro__ if c.__name__ in TYPES), cls.__name__)
    if name not in TYPES:
        raise ValueError(f"intervention type {obj!r} is not supported; use one of {', '.join(TYPES)}")
    return name


def lookup(obj) -> InterventionType:
    """The record of ``obj`` (anything :func:`type_name` takes)."""
    return TYPES[type_name(obj)]


def cli_choices() -> Dict[str, str]:
    """``--intervention`` choice -> class name."""
    return {t.cli_name: t.name for t in TYPES.values()}


class names_where(Set):
    """The live set of registered class names whose record satisfies ``trait`` (a record
    attribute name, or ``not <name>``); it follows later :func:`register` calls."""

    def __init__(self, trait: str):
        self._negate = trait.startswith("not ")
        self._trait = trait[4:] if self._negate else trait

    def _names(self) -> List[str]:
        return [n for n, t in TYPES.items() if bool(getattr(t, self._trait)) != self._negate]

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"{{{', '.join(map(repr, self._names()))}}}"


# --------------------------------------------------------------------------------------------
# pyvene's representations and intervention keys

# pyvene's RepresentationConfig fields, in its positional order (config.json holds such lists)
REPRESENTATION_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
                         "intervention_type", "intervention")


def intervention_key(layer, component, unit="pos", max_number_of_units=1, index=0,
                     key_format="new") -> str:
    """pyvene's intervention key; ``key_format`` "new" (pyvene >= 0.1.7, e.g.
    ``layer_15_comp_block_output_unit_pos_nunit_1#0``) or "old" (<= 0.1.6, dotted). A component
    path (with dots) drops the layer: ``comp_model_layers[3]_output_unit_pos_nunit_1#0``."""
    if key_format == "new":
        u = unit.replace(".", "_")
        if "." in component:
            return f"comp_{component.replace('.', '_')}_unit_{u}_nunit_{max_number_of_units}#{index}"
        return f"layer_{layer}_comp_{component}_unit_{u}_nunit_{max_number_of_units}#{index}"
    if key_format == "old":
        if "." in component:
            return f"comp.{component}.unit.{unit}.nunit.{max_number_of_units}#{index}"
        return f"layer.{layer}.comp.{component}.unit.{unit}.nunit.{max_number_of_units}#{index}"
    raise ValueError(f"key_format={key_format!r} is unknown; use 'new' or 'old'")


def representation_keys(reps, key_format="new") -> List[str]:
    """Keys of (layer, component, unit, max_number_of_units) tuples in order; ``#i`` counts the
    earlier representations with the same key (pyvene's collision counter)."""
    seen: Dict[str, int] = {}
    out = []
    for layer, comp, unit, n in reps:
        base = intervention_key(layer, comp, unit, n, 0, key_format)[:-2]
        seen[base] = seen.get(base, -1) + 1
        out.append(f"{base}#{seen[base]}")
    return out
