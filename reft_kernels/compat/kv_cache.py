"""The KV-cache keyword and output field across transformers versions.

Newer transformers (5.24 here) name a model call's KV cache ``cache`` (argument and output
field); the old ``past_key_values`` keyword still works there with a ``FutureWarning``
("``past_key_values`` is deprecated and will be removed in version 5.40.0 ... Use ``cache``
instead"), and once it is removed the models' ``**kwargs`` would swallow it (5.24 already runs a
call with an unknown keyword without error: the call would run without its prefix).
transformers 4.x knows only ``past_key_values``. The name is read from the model itself (its
``forward`` signature; the output's fields), never from a version string.
"""
from __future__ import annotations

import inspect

__all__ = ["cache_keyword", "cache_kwargs", "output_cache"]

_NAMES = ("cache", "past_key_values")   # newest first


def cache_keyword(model) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model``'s forward takes its KV cache by.
    A wrapper whose forward names neither (``ReftModel(**kwargs)``) is asked for its ``.model``."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        params = inspect.signature(model.forward).parameters
        for name in _NAMES:
            if name in params:
                return name
        model = getattr(model, "model", None)
    return "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for a call of ``model`` that continues from ``cache``."""
    return {cache_keyword(model): cache}


def output_cache(outputs):
    """The KV cache a model call returned (``outputs.cache``, or ``outputs.past_key_values`` on
    output types that have no ``cache`` field)."""
    fields = getattr(type(outputs), "__dataclass_fields__", {})
    name = next((n for n in _NAMES if n in fields), "past_key_values")
    return getattr(outputs, name)
