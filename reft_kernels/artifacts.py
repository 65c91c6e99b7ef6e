"""What a training run leaves on disk, read back one way by the CLI, the server and the jobs.

* ``reft_run.json`` (:data:`RUN_INFO`): what ``reft-kernels train`` / ``demo`` record beside the
  adapter (base model, position rule, ``share_weights``, prompt template, dtype, ...):
  :func:`write_run_info`, :func:`read_run_info`.
* The adapter directory: :func:`resolve_adapter` takes what ``reft-kernels generate --adapter`` and
  ``reft-kernels serve --adapter NAME=PATH`` take -- a run directory (``reft_run.json`` + an
  ``adapter/`` folder) or an adapter directory itself (its ``reft_run.json``, if any, in the
  parent) -- and says where the checkpoint is and how its edits are placed (:class:`AdapterSpec`);
  :func:`locate_adapter` is its first half (where the checkpoint is), which the vLLM plugin's
  adapter store shares.
* The prompt template (:data:`TEMPLATES`): :func:`apply_template`.

The generation inputs built from these (left padding, each row's edited positions) are
:func:`reft_kernels.data.positions.left_pad` and :func:`reft_kernels.data.positions.prompt_locations`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ["RUN_INFO", "TEMPLATES", "AdapterError", "AdapterSpec", "read_run_info", "write_run_info",
           "locate_adapter", "resolve_adapter", "read_adapter_spec", "resolve_template", "apply_template"]

RUN_INFO = "reft_run.json"
TEMPLATES = ("instruction", "chat", "none")   # "auto" (train / generate) resolves to one of these


class AdapterError(ValueError):
    """An adapter that cannot be used as given (bad path, unreadable run info, unknown positions, ...)."""


def read_run_info(directory: str) -> Tuple[dict, str]:
    """(``reft_run.json`` of an adapter directory or of the run directory above it, where it was
    found); ({}, directory) when there is none."""
    for run_dir in (directory, os.path.dirname(os.path.abspath(directory))):
        path = os.path.join(run_dir, RUN_INFO)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f), run_dir
    return {}, directory


def write_run_info(directory: str, **info) -> str:
    """Write ``reft_run.json`` (base model path, positions, ...), read back by :func:`resolve_adapter`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RUN_INFO)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return path


@dataclass
class AdapterSpec:
    """One adapter on disk, resolved: where its checkpoint is and how to place its edits.
    ``positions`` is the training position rule, ``template`` the prompt template used in training
    (the server applies it to chat requests when the tokenizer has no chat template)."""

    path: str            # as given by the user
    adapter_dir: str     # the directory holding the checkpoint
    positions: str
    share_weights: bool
    template: str
    base_model: Optional[str]
    name: Optional[str] = None                  # the server's name for it
    info: dict = field(default_factory=dict)    # the whole reft_run.json ({} without one)


def locate_adapter(path, label: str = "--adapter") -> Tuple[dict, str]:
    """``(info, adapter_dir)`` of an adapter ``path`` (str or path-like): its ``reft_run.json``
    (``{}`` without one) and the directory holding the checkpoint -- ``path/adapter`` when ``path``
    is the run directory holding ``reft_run.json`` and that folder exists, else ``path`` itself.
    :class:`AdapterError` naming ``label``, the bad value and the fix for anything unusable (no
    such directory, an unreadable ``reft_run.json``, one that is not an object or whose
    ``share_weights`` is not a boolean, an empty directory)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not os.path.isdir(path):
        raise AdapterError(f"{label}: {path!r} is not a directory; pass the --output of "
                           "'reft-kernels train' / 'demo' or an adapter directory")
    try:
        info, run_dir = read_run_info(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:   # ValueError: not JSON
        raise AdapterError(f"{label}: its {RUN_INFO} cannot be read: {exc}") from None
    if not isinstance(info, dict):
        raise AdapterError(f"{label}: its {RUN_INFO} holds a JSON {type(info).__name__}, not an object "
                           "like {\"positions\": \"l1\", ...}; rewrite it as 'reft-kernels train' does")
    share = info.get("share_weights", False)
    if not isinstance(share, bool):   # bool("false") is True: tied weights where untied were trained
        raise AdapterError(f"{label}: its {RUN_INFO} records share_weights={share!r}; write true or false (JSON "
                           "booleans), as 'reft-kernels train' does")
    if not info and not os.listdir(path):
        raise AdapterError(f"{label}: {path!r} is an empty directory: no adapter was saved there; pass the "
                           "--output of 'reft-kernels train' / 'demo'")
    nested = os.path.join(run_dir, "adapter")
    return info, nested if os.path.isdir(nested) and os.path.abspath(path) == os.path.abspath(run_dir) else path


def resolve_adapter(path, name: Optional[str] = None, positions: Optional[str] = None,
                    default_positions: Optional[str] = None, template: Optional[str] = None,
                    positions_fix: str = "pass --positions (e.g. l1)") -> AdapterSpec:
    """Resolve an adapter ``path`` (where the checkpoint is: :func:`locate_adapter`); raise
    :class:`AdapterError` naming ``--adapter`` (or the adapter ``name``), the bad value and the fix.

    ``positions`` overrides the recorded rule (``generate --positions``); ``default_positions``
    serves only when none is recorded (``serve --positions``); ``template`` overrides the recorded
    template.
    """
    from .data.positions import parse_positions
    label = f"adapter {name!r}" if name is not None else "--adapter"
    info, adapter_dir = locate_adapter(path, label)
    path = os.fspath(path)
    positions = positions or info.get("positions") or default_positions
    if positions is None:
        raise AdapterError(f"{label}: {path!r} has no {RUN_INFO} recording its training positions; "
                           f"{positions_fix}")
    try:
        parse_positions(positions)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"{label}: {exc}") from None
    source = "template" if template else f"the template its {RUN_INFO} records,"
    template = template or info.get("template") or "instruction"
    if template not in TEMPLATES + ("auto",):
        raise AdapterError(f"{label}: {source} {template!r} is not one of {TEMPLATES + ('auto',)}")
    return AdapterSpec(path=path, adapter_dir=adapter_dir, positions=positions,
                       share_weights=info.get("share_weights", False), template=template,
                       base_model=info.get("model"), name=name, info=info)


def read_adapter_spec(name: str, path: str, default_positions: Optional[str] = None,
                      default_template: Optional[str] = None) -> AdapterSpec:
    """The server's adapter ``name`` at ``path`` (``serve --adapter NAME=PATH``, ``POST
    /v1/load_lora_adapter``): :func:`resolve_adapter` with ``serve``'s ``--positions`` (for
    adapters without ``reft_run.json``) and ``--template`` (overrides)."""
    if not name or not isinstance(name, str):
        raise AdapterError(f"adapter name {name!r} must be a non-empty string")
    return resolve_adapter(path, name=name, default_positions=default_positions, template=default_template,
                           positions_fix="start the server with --positions (e.g. --positions l1)")


def resolve_template(template: str, tokenizer) -> str:
    """``auto``: ``chat`` when the tokenizer has a chat template, else ``instruction``."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "instruction"
    return template


def apply_template(template: str, text: str, extra: str = "", tokenizer=None) -> str:
    """``text`` (and ``extra``, an input) in ``template``: ``instruction`` (pyreft's no-header
    Alpaca template), ``chat`` (one user turn in the tokenizer's chat template), ``none`` (as is)
    or ``auto``; ValueError for a chat template the tokenizer lacks or an unknown name."""
    from .jobs.prompts import chat_prompt, format_prompt
    template = resolve_template(template, tokenizer)
    if template == "instruction":
        return format_prompt(text, extra)
    joined = text + ("\n\n" + extra if extra else "")
    if template == "chat":   # the chat demo trains on chat_prompt: one home for the user turn
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("--template chat needs a tokenizer with a chat template; use --template instruction")
        return chat_prompt(tokenizer, joined)
    if template != "none":
        raise ValueError(f"template {template!r} is not one of {TEMPLATES + ('auto',)}")
    return joined
