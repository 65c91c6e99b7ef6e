"""``reft-kernels serve`` (also ``python -m reft_kernels.serving``): arguments and startup.

    reft-kernels serve --adapter NAME=PATH [--adapter NAME=PATH ...] [--model BASE]
                       [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--batch-window-ms 5]
                       [--enable-runtime-adapters] [--allowed-adapter-dir DIR] [--api-key KEY] [--debug]
                       [--max-prompts-per-request 16] [--max-tokens-per-request 65536]

Every ``serve`` flag is defined here (:func:`add_arguments`), and nowhere else. ``--model`` defaults to the base model recorded in the first adapter's ``reft_run.json``. The
argument names follow vLLM where it has one (``--served-model-name``, ``--max-model-len``,
``--lora-modules NAME=PATH ...`` as an alias of ``--adapter``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``,
``--api-key`` / ``VLLM_API_KEY``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ..base_models.pretrained import context_length, load_causal_lm
from .options import API_KEY_ENV_VARS, ServeOptions

__all__ = ["add_arguments", "build_parser", "serve_from_args", "main", "ServeError", "build_engine"]

RUNTIME_ENV_VARS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "REFT_ALLOW_RUNTIME_ADAPTERS")


class ServeError(Exception):
    """A startup error: one line on stderr, exit code 2."""


def _adapter_arg(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH, e.g. --adapter demo=reft_demo")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--adapter", dest="adapters", type=_adapter_arg, action="append", default=[],
                   metavar="NAME=PATH", help="serve the adapter at PATH (a train/demo output directory or an "
                   "adapter directory) as model NAME; repeatable")
    p.add_argument("--lora-modules", dest="adapters", type=_adapter_arg, nargs="+", action="extend",
                   metavar="NAME=PATH", help="vLLM's spelling of --adapter")
    p.add_argument("--model", help="base model directory or hub name (default: the one recorded in the first "
                   "adapter's reft_run.json)")
    p.add_argument("--served-model-name", help="the name clients use for the base model alone (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=16, help="most requests in one batched generate")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests after the last arrival (at most 4 windows)")
    p.add_argument("--batching", default="auto", choices=["auto", "mixed", "grouped"],
                   help="mixed: one generate with per-row adapters; grouped: one generate per adapter")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.add_argument("--positions", help="position rule for adapters without reft_run.json (e.g. l1, f7+l7)")
    p.add_argument("--template", choices=["instruction", "chat", "none"],
                   help="prompt template for chat requests when the tokenizer has no chat template "
                   "(default: each adapter's training template)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the base model; adapters keep their own (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton"],
                   help="kernel backend for the interventions; auto = native C++ on CPU, triton on CUDA, "
                        "else torch (default: auto)")
    p.add_argument("--enable-runtime-adapters", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also on when "
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    p.add_argument("--allowed-adapter-dir", metavar="DIR",
                   help="runtime loads only from below DIR (symlinks resolved); default: any path")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: the environment "
                   "variable REFT_KERNELS_API_KEY, else VLLM_API_KEY, else no key)")
    p.add_argument("--debug", action="store_true",
                   help="serve GET /debug/stats and show server paths in GET /v1/models")
    p.add_argument("--max-prompts-per-request", type=_positive, default=ServeOptions.max_prompts_per_request,
                   help="most prompts in one /v1/completions request (a 400 above it)")
    p.add_argument("--max-tokens-per-request", type=_positive, default=ServeOptions.max_tokens_per_request,
                   help="most prompt tokens + max_tokens, summed over a request's prompts (a 400 above it)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"],
                   help="hf: transformers generate with a batching window; vllm: vLLM with the reft_kernels plugin "
                   "(paged KV cache, continuous batching; pip install -e \".[vllm]\"); auto: vllm when installed")
    p.add_argument("--vllm-args", default="{}", type=_json_object, metavar="JSON",
                   help="extra vLLM EngineArgs as a JSON object, e.g. '{\"tensor_parallel_size\": 2}' (--engine vllm)")
    return p


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc}); pass an object such as "
                                         "'{\"enforce_eager\": true}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object of vLLM EngineArgs")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def api_key_from(args) -> Optional[str]:
    """--api-key, else the first of API_KEY_ENV_VARS that is set (non-empty)."""
    if args.api_key:
        return args.api_key
    return next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)


def serve_options(args) -> ServeOptions:
    if args.allowed_adapter_dir is not None and not os.path.isdir(args.allowed_adapter_dir):
        raise ServeError(f"--allowed-adapter-dir {args.allowed_adapter_dir!r} is not a directory")
    return ServeOptions(api_key=api_key_from(args), debug=args.debug,
                        max_prompts_per_request=args.max_prompts_per_request,
                        max_tokens_per_request=args.max_tokens_per_request,
                        allowed_adapter_dir=args.allowed_adapter_dir)


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="reft-kernels serve", description="OpenAI-compatible server for a base model and its ReFT adapters"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_base(name: str, dtype: str, device: Optional[str]):
    import torch
    try:
        model, tok, _ = load_causal_lm(name, getattr(torch, dtype))
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok


def build_engine(args):
    """(engine, served name, context length, base path) from parsed arguments."""
    from ..artifacts import AdapterError, read_adapter_spec
    from .engine import Engine
    names = [n for n, _ in args.adapters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ServeError(f"--adapter names must be unique; {dup} given more than once")
    model_name = args.model
    if model_name is None:
        if not args.adapters:
            raise ServeError("pass --model (the base model) and/or --adapter NAME=PATH")
        try:
            model_name = read_adapter_spec(*args.adapters[0], args.positions).base_model
        except AdapterError as exc:
            raise ServeError(str(exc)) from None
        if model_name is None:
            raise ServeError(f"the adapter {args.adapters[0][1]!r} does not record its base model; pass --model")
    served = args.served_model_name or model_name
    if served in names:
        raise ServeError(f"adapter name {served!r} is the base model's served name; rename the adapter")
    kind = engine_kind(args)
    if kind == "vllm":
        return _build_vllm_engine(args, model_name, served)
    model, tok = load_base(model_name, args.dtype, args.device)
    try:
        engine = Engine(model, tok, mode=args.batching, max_batch_size=args.max_batch_size,
                        batch_window_s=args.batch_window_ms / 1000.0, backend=args.backend,
                        default_positions=args.positions, default_template=args.template)
        for name, path in args.adapters:
            engine.load_adapter(name, path)
    except (AdapterError, ValueError) as exc:
        raise ServeError(str(exc)) from None
    engine.warmup()
    ctx = args.max_model_len or context_length(model, tok)
    return engine, served, ctx, model_name


def engine_kind(args) -> str:
    """'hf' or 'vllm' from --engine (auto: vllm when it is installed and no --device other than its own)."""
    from .vllm_engine import vllm_available
    if args.engine == "vllm" and not vllm_available():
        raise ServeError("--engine vllm needs vLLM: pip install -e \".[vllm]\" (see docs/serving.md)")
    if args.engine == "auto":
        return "vllm" if vllm_available() else "hf"
    return args.engine


def _build_vllm_engine(args, model_name: str, served: str):
    from ..artifacts import AdapterError
    from .vllm_engine import VllmEngine
    from ..base_models.pretrained import resolve_model
    try:
        path = resolve_model(model_name)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    try:
        engine = VllmEngine(path, dtype=args.dtype, max_batch_size=args.max_batch_size,
                            max_model_len=args.max_model_len, default_positions=args.positions,
                            default_template=args.template, vllm_args=args.vllm_args)
        for name, adapter_path in args.adapters:
            engine.load_adapter(name, adapter_path)
    except (AdapterError, ValueError, TypeError) as exc:
        raise ServeError(str(exc)) from None
    engine.warmup()
    ctx = args.max_model_len or engine.llm.model_config.max_model_len
    return engine, served, ctx, model_name


def serve_from_args(args) -> int:
    """Run the server until interrupted; a startup error prints one line and returns 2."""
    try:
        return _serve(args)
    except ServeError as exc:
        print(f"reft-kernels serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args) -> int:
    import uvicorn

    from .app import create_app
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import transformers
    transformers.logging.set_verbosity_error()
    runtime = args.enable_runtime_adapters or any(_env_true(v) for v in RUNTIME_ENV_VARS)
    options = serve_options(args)
    engine, served, ctx, root = build_engine(args)
    app = create_app(engine, served, ctx, enable_runtime_adapters=runtime, model_root=root, options=options)
    logging.getLogger("reft_kernels.serving").info(
        "serving %s + adapters %s on http://%s:%d/v1 (batching: %s, max batch %d, window %.1f ms, runtime "
        "adapters %s, API key %s)", served, sorted(engine.specs), args.host, args.port, engine.mode,
        engine.max_batch_size, 1000 * engine.batch_window_s, "on" if runtime else "off",
        "required" if options.api_key else "off")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return serve_from_args(build_parser().parse_args(argv))
