"""Trainer callbacks whose module imports transformers only on first use (PEP 562 ``__getattr__``)."""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["lazy_callback"]


def lazy_callback(namespace: dict, name: str, base: type, doc: str, init: Optional[Callable] = None):
    """The module ``__getattr__`` that builds ``name`` -- a ``(base, transformers.TrainerCallback)``
    subclass with docstring ``doc`` (and ``__init__`` ``init``) -- on first access, and keeps it in
    the module's ``namespace`` (its ``globals()``)."""
    module = namespace["__name__"]

    def __getattr__(attr):
        if attr != name:
            raise AttributeError(f"module {module!r} has no attribute {attr!r}")
        from transformers import TrainerCallback
        body = {"__doc__": doc, "__module__": module, "__qualname__": name}
        if init is not None:
            body["__init__"] = init
        namespace[name] = cls = type(name, (base, TrainerCallback), body)
        return cls
    return __getattr__
