"""OpenAI-compatible serving of a base model with many ReFT adapters (``reft-kernels serve``).

* :mod:`.engine` -- named adapters on one base model, the batching queue, one batched generate;
* :mod:`.rows` -- per-row sampling, stop rules and streaming inside one ``generate``;
* :mod:`.adapters` -- adapter directories and their position rules;
* :mod:`.app` / :mod:`.protocol` -- the FastAPI app (imports fastapi; the rest does not);
* :mod:`.server` -- command-line arguments and startup.

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
