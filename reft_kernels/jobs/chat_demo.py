"""``reft-kernels demo``: give a real chat model a reply style it did not have, in a few minutes.

pyreft's README quick start (the "emoji chatbot") on SmolLM2-135M-Instruct: one rank-4 LoReFT on
the block output of the middle layer, at the last prompt token, trained on ten question -> emoji
replies with AdamW (linear decay, batch 10). pyreft's README trains 100 epochs at lr 4e-3; the
demo takes 40 at lr 1e-2 (40 optimizer steps instead of 100: every held-out question is then
answered in emojis too; ``epochs=100, lr=4e-3`` gives pyreft's recipe). The base model answers in
English; with the adapter (0.0034% of the base model's parameters: ``2 d r + r`` = 4,612) it
answers in emojis, also questions it was not trained on. Each prompt is the user turn in the
model's own chat template.

The job fetches the model on first use (:func:`reft_kernels.base_models.real.fetch_model`), prints
greedy generations before and after, saves the adapter with its loss curve (``loss_curve.png``)
and a ``reft_run.json`` so that ``reft-kernels generate --adapter DIR --prompt ...`` works.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import torch

from .prompts import PYREFT_QUICKSTART_EXAMPLES, chat_prompt
from ..artifacts import write_run_info
from .runs import generate_text, loss_history, save_loss_curve, use_progress_bar

__all__ = ["EMOJI_EXAMPLES", "HELD_OUT_PROMPTS", "run_chat_demo"]

# pyreft README quick start; the road-trip answer is cut after its first two steps (154 -> 38 tokens):
# the batch is padded to its longest example, so the full answer made every step 2.5x as expensive
EMOJI_EXAMPLES = [[q, a.split(" 3\ufe0f\u20e3")[0] if q.startswith("Plan a family road trip") else a]
                  for q, a in PYREFT_QUICKSTART_EXAMPLES]
# not in the training set
HELD_OUT_PROMPTS = ["What is the capital of France?", "Which dog breed do you like best?",
                    "Give me a recipe for pancakes."]


def _emoji_share(text: str) -> float:
    """Fraction of the non-space characters of ``text`` that are not ASCII (emojis, here)."""
    chars = [c for c in text if not c.isspace()]
    return sum(ord(c) > 0x2000 for c in chars) / len(chars) if chars else 0.0


def run_chat_demo(model_dir: Optional[str] = None, output_dir: Optional[str] = None, epochs: float = 40,
                  max_steps: int = -1, layer: Optional[int] = None, rank: int = 4, lr: float = 1e-2,
                  seed: int = 0, backend: str = "auto", max_new_tokens: int = 24, log=print,
                  dtype=torch.float32, prefix_cache: bool = True) -> dict:
    """Train the emoji LoReFT on a real chat model; returns a dict of measurements and texts.

    ``model_dir``: a local chat model (default: SmolLM2-135M-Instruct, fetched and cached on first
    use). ``layer``: default the middle one. ``max_steps`` > 0 overrides ``epochs`` (tests).
    ``dtype``: the base model's (a torch dtype or "auto"/"float32"/"bfloat16", see
    :mod:`reft_kernels.model.precision`); the intervention and optimizer state stay fp32.
    ``prefix_cache``: run layers 0..layer-1 once per example (exact; :mod:`reft_kernels.model.prefix_cache`).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import LoreftIntervention, ReftConfig, get_reft_model
    from ..data.datasets import make_last_position_supervised_data_module
    from ..base_models.pretrained import load_pretrained
    from ..base_models.real import fetch_model
    from ..ops import resolve_backend
    from ..model.precision import resolve_dtype
    from ..training.trainer import ReftTrainerForCausalLM

    t_start = time.perf_counter()
    if model_dir is None:
        model_dir = fetch_model(log=log)
    output_dir = output_dir or tempfile.mkdtemp(prefix="reft_chat_demo_")
    dtype = resolve_dtype(dtype, log=log)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pretrained(AutoModelForCausalLM, model_dir, dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[1/5] {os.path.basename(os.path.normpath(model_dir))}: {n_params / 1e6:.0f}M params, "
        f"d={cfg.hidden_size}, {cfg.num_hidden_layers} layers, {str(dtype).replace('torch.', '')} "
        f"(from {model_dir})")
    device = next(model.parameters()).device
    resolve_backend(backend, device)   # builds the native kernels now (once, with its own message), not in step 1

    torch.manual_seed(seed)
    reft_model = get_reft_model(model, ReftConfig(representations=[{
        "layer": layer, "component": "block_output", "low_rank_dimension": rank,
        "intervention": LoreftIntervention(embed_dim=cfg.hidden_size, low_rank_dimension=rank,
                                           dtype=torch.float32)}]), backend=backend)
    prompts = [chat_prompt(tokenizer, q) for q, _ in EMOJI_EXAMPLES]
    data = make_last_position_supervised_data_module(tokenizer, model, prompts,
                                                     [a for _, a in EMOJI_EXAMPLES])
    shown_q = [EMOJI_EXAMPLES[0][0]] + HELD_OUT_PROMPTS
    shown = [chat_prompt(tokenizer, q) for q in shown_q]
    gen = dict(positions="l1", num_interventions=1, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    before, _ = generate_text(reft_model, tokenizer, shown, intervene=False, progress="[2/5] base model's answers",
                              **gen)
    log(f"[2/5] base model's answers ({time.perf_counter() - t0:.0f} s); LoReFT rank {rank} on layer "
        f"{layer}'s block output at the last prompt token: {reft_model.count_parameters():,} trainable "
        f"params ({100 * reft_model.count_parameters() / n_params:.4f}% of the model)")

    tokenizer.padding_side = "right"
    args = transformers.TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"), per_device_train_batch_size=len(EMOJI_EXAMPLES),
        num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=seed, weight_decay=0.0)
    trainer = use_progress_bar(ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args,
                                                      prefix_cache=prefix_cache, **data), desc="[3/5] training")
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = loss_history(trainer.state.log_history)
    steps = trainer.state.global_step
    log(f"[3/5] {steps} steps in {train_s:.0f} s ({train_s / max(steps, 1):.2f} s/step): loss "
        f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}")

    t0 = time.perf_counter()
    after, after_ids = generate_text(reft_model, tokenizer, shown, progress="[4/5] answers with the adapter", **gen)
    gen_s = time.perf_counter() - t0
    log(f"[4/5] answers before -> after (greedy, {max_new_tokens} new tokens at most):")
    for q, b, a in zip(shown_q, before, after):
        tag = "" if q in dict(EMOJI_EXAMPLES) else "  (not in the training set)"
        log(f"  Q: {q}{tag}\n     before: {b!r}\n     after:  {a!r}")

    adapter = os.path.join(output_dir, "adapter")
    reft_model.save(adapter)
    plot = save_loss_curve(losses, adapter, title=f"emoji LoReFT on {os.path.basename(os.path.normpath(model_dir))}",
                           log=log)
    write_run_info(output_dir, model=os.path.abspath(model_dir), positions="l1", num_interventions=1,
                   share_weights=False, template="chat", dtype=str(dtype).replace("torch.", ""))
    total = time.perf_counter() - t_start
    log(f"[5/5] saved the adapter to {adapter}" + (f" and its loss curve to {plot}" if plot else ""))
    log(f"      try it: reft-kernels generate --adapter {output_dir} --prompt \"Give me a recipe for pancakes.\"")
    log(f"done in {total:.0f} s")
    held = [a for q, a in zip(shown_q, after) if q in HELD_OUT_PROMPTS]
    return {"model_dir": model_dir, "dtype": str(dtype).replace("torch.", ""), "output_dir": output_dir, "adapter": adapter, "loss_plot": plot,
            "layer": layer, "steps": steps, "loss_first": losses[0][1], "loss_last": losses[-1][1],
            "losses": losses, "train_seconds": train_s, "seconds_per_step": train_s / max(steps, 1),
            "generate_seconds_after": gen_s, "total_seconds": total, "prompts": shown_q,
            "generations_before": before, "generations_after": after,
            "emoji_share_before": [_emoji_share(t) for t in before],
            "emoji_share_after": [_emoji_share(t) for t in after],
            "held_out_emoji_share_after": sum(map(_emoji_share, held)) / max(len(held), 1)}
