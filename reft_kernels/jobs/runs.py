"""What every training job shares: generation before/after, the loss curve (``reft_run.json`` is
:mod:`reft_kernels.artifacts`')."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["generate_text", "loss_history", "save_loss_curve", "use_progress_bar"]

LOSS_JSON = "loss_curve.json"
LOSS_PNG = "loss_curve.png"


def generate_text(reft_model, tokenizer, prompts, positions: str, num_interventions: int,
                  share_weights: bool = False, max_new_tokens: int = 20, intervene: bool = True,
                  progress: Optional[str] = None):
    """Greedy generations for ``prompts`` (left-padded batch), with or without the interventions.
    ``progress``: show a bar with this label, one tick per generated token.

    Returns ``(texts, new_token_ids)``.
    """
    from ..data.datasets import make_generation_inputs
    tokenizer.padding_side = "left"
    batch = make_generation_inputs(tokenizer, prompts, positions, num_interventions, share_weights,
                                   device=next(reft_model.model.parameters()).device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id)
    reft_model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        from transformers import LogitsProcessor, LogitsProcessorList
        bar = tqdm(total=max_new_tokens, desc=progress, unit="tok", dynamic_ncols=True, leave=False)

        class _Tick(LogitsProcessor):   # one call per generated token; scores unchanged
            def __call__(self, input_ids, scores):
                bar.update(1)
                return scores
        kw["logits_processor"] = LogitsProcessorList([_Tick()])
    with torch.no_grad():
        if intervene:
            out = reft_model.generate(**batch, **kw)
        else:
            out = reft_model.model.generate(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"], **kw)
    if bar is not None:
        bar.close()
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new], new


def loss_history(log_history: Sequence[dict]) -> List[Tuple[int, float]]:
    """``(step, training loss)`` pairs from a ``transformers.Trainer``'s ``state.log_history``."""
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def save_loss_curve(points: Sequence[Tuple[int, float]], directory: str, title: str = "training loss",
                    log=print) -> Optional[str]:
    """Write ``loss_curve.json`` and ``loss_curve.png`` (matplotlib) into ``directory``.

    Returns the PNG's path, or None (with one message) when matplotlib is not installed or there
    are no points; the JSON is written whenever there are points.
    """
    points = [(int(s), float(v)) for s, v in points]
    if not points:
        return None
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOSS_JSON), "w", encoding="utf-8") as f:
        json.dump({"step": [s for s, _ in points], "loss": [v for _, v in points]}, f)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"(no loss plot: matplotlib is not installed; the curve is in {LOSS_JSON}; "
            "pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 60 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, LOSS_PNG)
    fig.savefig(path)
    plt.close(fig)
    return path


def use_progress_bar(trainer, desc: str = "training"):
    """Replace ``trainer``'s progress output with one tqdm bar showing the latest loss.

    Log every step (``logging_steps=1``) for a detailed loss curve without printing a dict per
    step: the Trainer's printer/progress callbacks are removed and this bar takes their place.
    """
    import transformers
    from tqdm.auto import tqdm

    class _Bar(transformers.TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc=desc, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(_Bar())
    return trainer
