"""``reft-kernels demo --tiny``: a LoReFT on a tiny Llama in seconds, no download (CI, tests).

A 2-layer d=64 Llama with a word-level tokenizer is pretrained for a few seconds on the plain
question/answer texts of the shipped instruction set (a stand-in for a pretrained model: it never
saw the instruction template); a rank-8 LoReFT at ``f7+l7`` on both layers then teaches it to
answer in the template. The job prints generations before/after, saves the base model (pass its
directory as ``--model`` to ``reft-kernels train``) and the adapter with its loss curve, reloads the
adapter on a fresh copy and checks the generations are identical, and times the op backends.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..base_models.tiny import build_word_tokenizer, pretrain_base, tiny_llama
from .prompts import format_prompt, load_builtin_instructions
from ..artifacts import write_run_info
from .runs import generate_text, loss_history, save_loss_curve, use_progress_bar

__all__ = ["DEMO_PROMPTS", "demo_reft_setup", "op_timings", "run_tiny_demo"]

DEMO_PROMPTS = [("What is the capital of Italy?", ""), ("Translate the word to French.", "dog"),
                ("What is the opposite of hot?", "")]


def demo_reft_setup(model, num_layers: int, rank: int, positions: str, dtype=torch.float32,
                    dropout: float = 0.0, backend: str = "auto"):
    """LoReFT on every block output; untied ``f+l`` positions get two interventions per layer.

    Returns ``(reft_model, num_interventions, share_weights)``.
    """
    from .. import LoreftIntervention, ReftConfig, get_reft_model
    from ..data.datasets import parse_positions
    first_n, last_n = parse_positions(positions)
    layers = list(range(num_layers))
    untied = first_n > 0 and last_n > 0
    width = model.config.hidden_size
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": rank,
             "intervention": LoreftIntervention(embed_dim=width, low_rank_dimension=rank, dtype=dtype,
                                                dropout=dropout)}
            for i in (layers + layers if untied else layers)]
    reft_model = get_reft_model(model, ReftConfig(representations=reps), backend=backend)
    return reft_model, len(reps), False


def op_timings(backends=("torch", "native", "triton"), batch: int = 4, seq_len: int = 256,
               dim: int = 256, rank: int = 8, n_positions: int = 14, repeats: int = 5) -> list:
    """Median forward+backward time of ``reft_kernels.ops.loreft`` per backend.

    Rows: ``(backend, milliseconds or None, note)``; an unavailable backend gets its reason.
    Triton on a CPU runs in its interpreter (slow by design, checked for correctness not speed).
    """
    import statistics
    import time as _time

    from .. import ops
    from ..ops.autograd import get_backend
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq_len, dim, generator=g)
    pos = torch.stack([torch.randperm(seq_len, generator=g)[:n_positions] for _ in range(batch)])
    R = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0].t().contiguous()
    W = torch.randn(rank, dim, generator=g) * 0.05
    b = torch.zeros(rank)
    rows = []
    for name in backends:
        try:
            mod = get_backend(name)
            ok = getattr(mod, "is_available", lambda d: True)(device)
            reason = "" if ok else getattr(mod, "unavailable_reason", lambda d: "unavailable")(device)
        except Exception as exc:  # noqa: BLE001 - report, don't fail the demo
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            rows.append((name, None, reason))
            continue
        reps = 1 if name == "triton" else repeats
        times = []
        for _ in range(reps + 1):
            x = h.clone().requires_grad_(True)
            params = [t.clone().requires_grad_(True) for t in (R, W, b)]
            t0 = _time.perf_counter()
            y = ops.loreft(x, pos, *params, backend=name)
            y.sum().backward()
            times.append(_time.perf_counter() - t0)
        note = "Triton interpreter (CPU)" if name == "triton" and device.type == "cpu" else ""
        rows.append((name, 1000 * statistics.median(times[1:]), note))
    return rows


def run_tiny_demo(output_dir: Optional[str] = None, epochs: int = 60, quick: bool = False, seed: int = 0,
             backend: str = "auto", ops: str = "all", log=print) -> dict:
    """Train a LoReFT on the shipped instruction set with a tiny Llama; see ``reft-kernels demo``.

    ``quick`` trains 2 epochs (for tests). Returns a dict of measurements.
    """
    import tempfile
    import time as _time

    import transformers
    from tqdm.auto import tqdm

    from .. import ReftModel
    from ..data.datasets import make_multiple_position_supervised_data_module
    from ..training.trainer import ReftTrainerForCausalLM

    t_start = _time.perf_counter()
    torch.manual_seed(seed)
    output_dir = output_dir or tempfile.mkdtemp(prefix="reft_demo_")
    rows = load_builtin_instructions()
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    outputs = [r["output"] for r in rows]
    tokenizer = build_word_tokenizer(prompts + outputs)
    hidden, layers, rank, positions = 64, 2, 8, "f7+l7"
    model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=seed)
    log(f"[1/6] tiny Llama ({sum(p.numel() for p in model.parameters()):,} params, d={hidden}, "
        f"{layers} layers), word tokenizer ({len(tokenizer)} words), {len(rows)} instructions")

    # A stand-in for a pretrained model: it learns the questions and their answers as plain
    # text, without the instruction template, which it has never seen; the LoReFT (on the
    # template's first and last tokens) teaches it to answer in the template.
    plain = [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows]

    def docs(step):
        return plain
    pre_steps = 20 if quick else 100
    bar = tqdm(total=pre_steps, desc="[2/6] pretraining the base model", leave=False)
    pre_loss = pretrain_base(model, tokenizer, docs, steps=pre_steps,
                             progress=lambda s, l: (bar.update(1), bar.set_postfix(loss=f"{l:.3f}")))
    bar.close()
    log(f"[2/6] base model pretrained on the plain question/answer texts (LM loss {pre_loss:.3f})")

    reft_model, n_iv, share = demo_reft_setup(model, layers, rank, positions, backend=backend)
    data = make_multiple_position_supervised_data_module(
        tokenizer, model, prompts, outputs, positions=positions, num_interventions=n_iv,
        share_weights=share)
    tokenizer.padding_side = "right"
    full = data["data_collator"]([data["train_dataset"][i] for i in range(len(rows))])

    def dataset_loss():
        reft_model.eval()
        with torch.no_grad():
            return float(reft_model(**full).loss)

    shown = [format_prompt(i, x) for i, x in DEMO_PROMPTS]
    before, _ = generate_text(reft_model, tokenizer, shown, positions, n_iv, share, intervene=False)
    loss_before = dataset_loss()
    log(f"[3/6] LoReFT rank {rank} at positions {positions} on {layers} layers "
        f"({reft_model.count_parameters():,} trainable params); dataset loss {loss_before:.3f}")

    args = transformers.TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"), per_device_train_batch_size=8,
        num_train_epochs=2 if quick else epochs, learning_rate=2e-2, lr_scheduler_type="linear",
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=seed, weight_decay=0.0)
    trainer = use_progress_bar(ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args,
                                                      **data), desc="[4/6] training the LoReFT")
    t_train = _time.perf_counter()
    trainer.train()
    train_s = _time.perf_counter() - t_train
    loss_after = dataset_loss()
    cut = 1.0 - loss_after / loss_before
    log(f"[4/6] trained in {train_s:.1f} s: dataset loss {loss_before:.3f} -> {loss_after:.3f} "
        f"({100 * cut:.0f}% lower)")

    after, after_ids = generate_text(reft_model, tokenizer, shown, positions, n_iv, share)
    reference = {(r["instruction"], r["input"]): r["output"] for r in rows}
    correct = []
    for (ins, inp), b, a in zip(DEMO_PROMPTS, before, after):
        want = reference[(ins, inp)]
        # the word tokenizer lower-cases and splits punctuation: compare word by word
        correct.append(a.split() == tokenizer.decode(tokenizer(want)["input_ids"]).split())
        log(f"  Q: {ins}{' [' + inp + ']' if inp else ''}\n     before: {b}\n     after:  {a}"
            + ("   (= the training answer)" if correct[-1] else f"   (training answer: {want!r})"))
    log(f"      {sum(correct)}/{len(correct)} answers match the training set"
        + ("" if all(correct) else " (a 2-layer toy model may memorise only part of it)")
        + "; 'reft-kernels demo --real' shows a real model learn a new reply style")

    adapter = os.path.join(output_dir, "adapter")
    base_dir = os.path.join(output_dir, "base_model")
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    reft_model.save(adapter)
    plot = save_loss_curve(loss_history(trainer.state.log_history), adapter,
                           title="tiny demo: LoReFT training loss", log=log)
    write_run_info(output_dir, model=base_dir, positions=positions, num_interventions=n_iv,
                   share_weights=share, template="instruction")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    reloaded = ReftModel.load(adapter, fresh, backend=backend)
    again, again_ids = generate_text(reloaded, tokenizer, shown, positions, n_iv, share)
    identical = bool(torch.equal(after_ids, again_ids))
    log(f"[5/6] saved the adapter to {adapter}; reloaded it on a fresh copy of the base model: "
        f"generations {'identical' if identical else 'DIFFERENT'}"
        + (f"; loss curve: {plot}" if plot else ""))
    log(f"      the base model is in {base_dir}: train your own adapter on it with\n"
        f"      reft-kernels train --model {base_dir} --data builtin --layers 0,1 --output runs/r1")

    timings = []
    if ops != "none":
        timings = op_timings(("torch",) if ops == "torch" else ("torch", "native", "triton"))
        log("[6/6] reft_kernels.ops.loreft forward+backward, B=4 T=256 d=256 r=8 14 positions (CPU):")
        log(f"  {'backend':<8} {'ms':>10}  note")
        for name, ms, note in timings:
            log(f"  {name:<8} {('%.2f' % ms) if ms is not None else '-':>10}  {note}")
    total = _time.perf_counter() - t_start
    log(f"done in {total:.1f} s")
    return {"loss_before": loss_before, "loss_after": loss_after, "loss_cut": cut,
            "train_seconds": train_s, "total_seconds": total, "identical_after_reload": identical,
            "generations_before": before, "generations_after": after, "answers_correct": correct, "output_dir": output_dir,
            "op_timings": timings, "base_model_dir": base_dir, "loss_plot": plot}
