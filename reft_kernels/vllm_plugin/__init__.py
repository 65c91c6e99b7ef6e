"""reft_kernels as a vLLM general plugin: ReFT adapters on stock vLLM, one adapter per request.

Installed with ``pip install -e ".[vllm]"``; vLLM finds :func:`register` through the
``vllm.general_plugins`` entry point and calls it in every vLLM process. It registers
``Reft<Arch>`` model classes (:mod:`.model`) under vLLM's own architecture names, so a checkpoint
of a supported family loads with adapter support and behaves exactly as stock vLLM until a
request selects an adapter.

Using it:

* adapters: ``hf_overrides={"reft_adapters": {NAME: PATH}}`` (or ``{NAME: {"path": PATH,
  "positions": "l1"}}``), read in every worker with the same reader as ``ReftModel.load``;
* the batch state: ``logits_processors=[REFT_LOGITS_PROCESSOR]`` (vLLM's public per-request hook);
* per request: ``SamplingParams(extra_args={"reft_adapter": NAME})`` (``vllm_xargs`` over HTTP) and
  the prompt's ``cache_salt`` from :func:`cache_salt` (:func:`reft_prompt` builds both);
  decode-time edits with ``extra_args["reft_generated_positions"]`` (``"all"``, ``k`` = every k-th
  generated token, or a list of generated-token indices, as ``ReftModel.generate``);
* unknown names: the processor's ``validate_params`` refuses a request naming no loaded adapter in
  vLLM's front end (400 over HTTP). The front end learns the names from the endpoint part
  (:mod:`.endpoint`, ``VLLM_PLUGINS=reft_kernels`` under ``vllm serve``), from ``--engine vllm``, or
  from :func:`publish_adapters` (``LLM``); see :mod:`.known`.

Modules: :mod:`.model` (classes, layer hooks), :mod:`.store` (adapters, stacking), :mod:`.plan`
(which tokens a step edits), :mod:`.batch_state` (the logits processor), :mod:`.known` and
:mod:`.endpoint` (which names a request may use), :mod:`.worker` (runtime loads), :mod:`.shim` (the
one read of vLLM internals, version-checked).
"""
from __future__ import annotations

import json
from typing import Optional

from .known import ADAPTER_KEY, GENERATED_KEY   # their one home

__all__ = ["register", "REFT_LOGITS_PROCESSOR", "ADAPTER_KEY", "GENERATED_KEY", "cache_salt", "reft_prompt",
           "publish_adapters"]

REFT_LOGITS_PROCESSOR = "reft_kernels.vllm_plugin.batch_state:ReftBatchState"


def register() -> None:
    """vLLM general-plugin entry point: register the ``Reft<Arch>`` model classes."""
    from .model import register_models
    register_models()


def publish_adapters(source):
    """Tell this front end which adapters its engine serves (names, a ``VllmConfig`` or an ``LLM``), so
    a request naming another one is refused; see :mod:`.known` (``vllm serve`` and ``--engine vllm``
    do this themselves). Returns the published names."""
    from .known import publish
    return publish(source)


def cache_salt(adapter: Optional[str], positions: Optional[str], prompt_len: int,
               version: str = "", generated=None) -> Optional[str]:
    """The prefix-cache salt of a request: KV blocks are shared only between requests whose edits agree.

    None (no salt, share with everyone) without an adapter. With one, the adapter's name (and its
    load ``version``, so a reloaded adapter never reuses its predecessor's blocks); when the adapter
    edits last-k positions, also the prompt length, because the edited positions ``L-k..L-1``
    move with it (a prompt that is a prefix of another has its edits elsewhere). With decode-time
    edits (``generated``, the ``reft_generated_positions`` value), also the rule and the prompt
    length: vLLM caches blocks of generated tokens too, and a later prompt that contains this
    answer must not reuse tokens edited by a rule it does not have.
    """
    if adapter is None:
        return None
    from ..data.positions import parse_positions
    _first, last = parse_positions(positions)
    salt = f"reft:{adapter}:{version}"
    if generated is not None:
        return f"{salt}:G{json.dumps(generated, separators=(',', ':'))}:L{prompt_len}"
    return f"{salt}:L{prompt_len}" if last else salt


def reft_prompt(prompt_token_ids, adapter: Optional[str], positions: Optional[str], version: str = "") -> dict:
    """A vLLM token prompt with the salt of :func:`cache_salt` (pair it with ``extra_args``)."""
    prompt = {"prompt_token_ids": list(prompt_token_ids)}
    salt = cache_salt(adapter, positions, len(prompt["prompt_token_ids"]), version)
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt
