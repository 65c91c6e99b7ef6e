"""OpenAI-compatible serving of a base model with many ReFT adapters (``reft-kernels serve``).

* :mod:`.engine` -- named adapters on one base model, the batching queue, one batched generate;
* :mod:`.rows` -- per-row sampling, stop rules and streaming inside one ``generate``;
* :mod:`.adapters` -- adapter directories and their position rules;
* :mod:`.app` / :mod:`.protocol` -- the FastAPI app (imports fastapi; the rest does not);
* :mod:`.server` -- command-line arguments and startup.

See docs/serving.md.
"""
from .engine import Engine, GenerationRequest, GenerationResult, UnknownAdapterError
from .rows import SamplingParams

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "UnknownAdapterError", "SamplingParams"]
