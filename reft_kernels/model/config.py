"""``ReftConfig``: which interventions go where, in pyreft's format, JSON-serialisable.

A config is an ordered list of representations, as in pyvene's ``IntervenableConfig``::

    ReftConfig(representations=[
        {"layer": 15, "component": "block_output", "low_rank_dimension": 4,
         "intervention": LoreftIntervention(embed_dim=4096, low_rank_dimension=4)},
        {"layer": 15, "component": "model.layers[15].output", "low_rank_dimension": 4,
         "intervention_type": "NoreftIntervention", "intervention_kwargs": {"add_bias": False}},
    ])

Order matters: it fixes the intervention keys and the order of ``unit_locations``. A
representation holds either a built ``intervention`` module (as in pyreft) or an
``intervention_type`` (class or class name) plus ``intervention_kwargs``, built by
:func:`reft_kernels.get_reft_model` with ``embed_dim`` = the model's hidden size.
:meth:`ReftConfig.to_dict` stores the class name and constructor kwargs, never a module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..interventions.registry import REPRESENTATION_FIELDS, intervention_key
from ..interventions.modules import ReftIntervention, intervention_class

__all__ = ["Representation", "ReftConfig", "representation_key"]

# pyvene RepresentationConfig fields that ReFT does not use; accepted and ignored.
_IGNORED_FIELDS = {"subspace_partition", "group_key", "intervention_link_key", "moe_key",
                   "source_representation", "hidden_source_representation", "latent_dim"}


@dataclass
class Representation:
    """One intervention site: ``layer`` + ``component`` (abstract name or pyvene string path)."""

    layer: Optional[int]
    component: str
    unit: str = "pos"
    max_number_of_units: int = 1
    low_rank_dimension: Optional[int] = None
    intervention: Optional[nn.Module] = None
    intervention_type: Optional[str] = None
    intervention_kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, rep, default_type=None) -> "Representation":
        """From a dict (pyreft style), a pyvene positional list, or a Representation."""
        if isinstance(rep, Representation):
            return rep
        if isinstance(rep, (list, tuple)):  # pyvene config.json: positional RepresentationConfig
            rep = dict(zip(REPRESENTATION_FIELDS, rep))
        if not isinstance(rep, dict):
            raise TypeError(f"representation {rep!r} must be a dict like "
                            "{'layer': 3, 'component': 'block_output', 'low_rank_dimension': 4, ...}")
        rep = {k: v for k, v in rep.items() if k not in _IGNORED_FIELDS}
        unknown = set(rep) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"representation has unknown keys {sorted(unknown)}; "
                            f"allowed: {sorted(cls.__dataclass_fields__)}")
        if "component" not in rep:
            raise ValueError(f"representation {rep!r} needs a 'component' (e.g. 'block_output')")
        out = cls(**rep)
        if out.unit != "pos":
            raise ValueError(f"unit={out.unit!r} is not supported; ReFT edits token positions, use unit='pos'")
        iv = out.intervention
        if iv is not None:
            if not isinstance(iv, ReftIntervention):
                raise TypeError(f"intervention is a {type(iv).__name__}; pass one of reft_kernels' "
                                "intervention modules (e.g. LoreftIntervention) or intervention_type")
            out.intervention_type = type(iv).__name__
            out.low_rank_dimension = iv.low_rank_dimension
        elif out.intervention_type is None and default_type is None:
            raise ValueError(f"representation for component {out.component!r} has neither "
                             "'intervention' nor 'intervention_type'; add one")
        out.intervention_type = intervention_class(out.intervention_type or default_type).__name__
        return out

    def kwargs(self) -> dict:
        """Constructor kwargs (without embed_dim when the module is not built yet)."""
        if self.intervention is not None:
            return self.intervention.config_kwargs()
        return {"low_rank_dimension": self.low_rank_dimension, **self.intervention_kwargs}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "component": self.component, "unit": self.unit,
                "max_number_of_units": self.max_number_of_units,
                "low_rank_dimension": self.low_rank_dimension,
                "intervention_type": self.intervention_type, "intervention_kwargs": self.kwargs()}


def representation_key(rep: Representation, counter: dict) -> str:
    """pyvene >= 0.1.7 key, e.g. ``layer_15_comp_block_output_unit_pos_nunit_1#0``.

    String components drop the layer: ``comp_model_layers[3]_output_unit_pos_nunit_1#0``.
    ``#i`` counts earlier representations with the same key proposal (``counter`` is updated).
    """
    proposal = intervention_key(rep.layer, rep.component, rep.unit, rep.max_number_of_units)[:-2]
    counter[proposal] = counter.get(proposal, -1) + 1
    return f"{proposal}#{counter[proposal]}"


class ReftConfig:
    """pyreft's ``ReftConfig(representations=..., intervention_types=...)``, JSON-serialisable.

    ``intervention_types`` (a class, class name or a list of them) is the default for
    representations that carry neither ``intervention`` nor ``intervention_type``. Other pyvene
    keywords (``mode``, ``sorted_keys``, ...) are accepted and ignored: ReFT is always "parallel".
    """

    def __init__(self, representations, intervention_types=None, **ignored):
        single = not isinstance(representations, (list, tuple)) or (
            len(representations) > 0 and isinstance(representations[0], (int, str, type(None))))
        reps = [representations] if single else list(representations)
        types = intervention_types if isinstance(intervention_types, (list, tuple)) else [intervention_types] * len(reps)
        if len(types) != len(reps):
            raise ValueError(f"intervention_types has {len(types)} entries for {len(reps)} representations; "
                             "pass one type per representation or a single type")
        self.representations = [Representation.parse(r, t) for r, t in zip(reps, types)]

    @property
    def keys(self) -> list:
        """pyvene >= 0.1.7 intervention keys, in config order."""
        counter: dict = {}
        return [representation_key(r, counter) for r in self.representations]

    def to_dict(self) -> dict:
        return {"representations": [r.to_dict() for r in self.representations], "keys": self.keys}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "ReftConfig":
        return cls(representations=[dict(r) for r in data["representations"]])

    @classmethod
    def from_json(cls, text: str) -> "ReftConfig":
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return f"ReftConfig({self.to_json()})"
