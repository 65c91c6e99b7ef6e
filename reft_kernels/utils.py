"""pyreft's ``pyreft.utils``: the task/adapter-type enums and :func:`get_reft_model`.

``TaskType`` is what pyreft's example scripts pass around (``TaskType.CAUSAL_LM`` /
``TaskType.SEQ_CLS``); nothing in reft_kernels branches on it, exactly as in pyreft 0.1.0.
"""
from __future__ import annotations

import enum

from .model.reft_model import ReftModel, get_reft_model

__all__ = ["TaskType", "ReftType", "get_reft_model", "ReftModel"]


class ReftType(str, enum.Enum):
    """Adapter types, as pyreft names them (``NLOREFT`` really is ``"NOREFT"`` there)."""

    LOREFT = "LOREFT"
    NLOREFT = "NOREFT"


class TaskType(str, enum.Enum):
    """Task types: ``SEQ_CLS`` (text classification) and ``CAUSAL_LM`` (language modelling)."""

    SEQ_CLS = "SEQ_CLS"
    CAUSAL_LM = "CAUSAL_LM"
