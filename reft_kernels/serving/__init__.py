"""OpenAI-compatible serving of a base model with many ReFT adapters (``reft-kernels serve``).

* :mod:`.engine` -- named adapters on one base model, the batching worker, one batched generate,
  failure isolation per request;
* :mod:`.scheduler` -- the fair queue (round-robin over HTTP requests);
* :mod:`.rows` -- per-row sampling, stop rules and streaming inside one ``generate``;
* :mod:`.app` / :mod:`.protocol` / :mod:`.guard` -- the FastAPI app, request bodies and errors, the
  outermost ASGI layer (key, body size, catch-all); they import fastapi / pydantic, the rest does not;
* :mod:`.options` -- the HTTP layer's security and limits;
* :mod:`.server` -- every ``serve`` flag, and startup.

See docs/serving.md.
"""
from importlib import import_module

# loaded on first use, so `reft-kernels serve --help` does not import torch
_EXPORTS = {"Engine": "engine", "GenerationRequest": "engine", "GenerationResult": "engine",
            "UnknownAdapterError": "engine", "SamplingParams": "rows"}
__all__ = ["Engine", "GenerationRequest", "GenerationResult", "UnknownAdapterError", "SamplingParams"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
