"""Self-contained building blocks for the demo, the examples and the tests: no hub access.

* :func:`load_builtin_instructions` -- the small instruction set shipped in ``reft_kernels/data``;
* :func:`build_word_tokenizer` -- a word-level ``PreTrainedTokenizerFast`` trained on given texts;
* :func:`tiny_llama` -- a small ``LlamaForCausalLM`` built from a config (random weights);
* :func:`pretrain_base` -- a few seconds of plain language-model training, a stand-in for a
  pretrained base model: it learns the texts but not the instruction -> response mapping;
* :func:`format_prompt` -- the instruction template used by the demo and the CLI.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

import torch

__all__ = ["DATA_DIR", "BUILTIN_DATA", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_INPUT", "format_prompt",
           "load_builtin_instructions", "build_word_tokenizer", "tiny_llama", "pretrain_base",
           "SPECIAL_TOKENS"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BUILTIN_DATA = os.path.join(DATA_DIR, "instructions.jsonl")
PROMPT_TEMPLATE = "### Instruction:\n%s\n\n### Response:\n"
PROMPT_TEMPLATE_INPUT = "### Instruction:\n%s\n\n### Input:\n%s\n\n### Response:\n"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The demo/CLI instruction template (no system header)."""
    if input_text:
        return PROMPT_TEMPLATE_INPUT % (instruction, input_text)
    return PROMPT_TEMPLATE % instruction


def load_builtin_instructions() -> List[dict]:
    """The shipped instruction set: dicts with ``instruction``, ``input`` and ``output``."""
    with open(BUILTIN_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_word_tokenizer(texts: Iterable[str], model_max_length: int = 512):
    """A lower-casing word-level tokenizer (words and punctuation) over ``texts``.

    Special tokens: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (bos), ``</s>`` 3 (eos). Unknown words map
    to ``<unk>``. Decoding joins words with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)


def tiny_llama(vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
               max_positions: int = 512, seed: int = 0, **config_kwargs):
    """A small random ``LlamaForCausalLM`` (pad 0, bos 2, eos 3, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                      **config_kwargs)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def pretrain_base(model, tokenizer, texts, steps: int = 150, lr: float = 3e-3,
                  progress: Optional[callable] = None) -> float:
    """Full-batch LM training of ``model``; each text is a document ending in eos.

    ``texts`` is a list of strings or a callable ``step -> list of strings`` (a fresh corpus per
    step). Returns the last loss. ``progress(step, loss)`` is called every step when given.
    """
    def batch(docs):
        ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in docs]
        width = max(map(len, ids))
        x = torch.tensor([d + [tokenizer.pad_token_id] * (width - len(d)) for d in ids])
        mask = (torch.arange(width)[None] < torch.tensor([len(d) for d in ids])[:, None]).long()
        return x, mask, x.masked_fill(mask == 0, -100)

    fixed = None if callable(texts) else batch(list(texts))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    last = float("nan")
    for step in range(steps):
        ids, mask, labels = fixed if fixed is not None else batch(texts(step))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        if progress is not None:
            progress(step, last)
    model.eval()
    return last


# ------------------------------------------------------------------------------------------------
# the `reft-kernels demo` command
# ------------------------------------------------------------------------------------------------
DEMO_PROMPTS = [("What is the capital of Italy?", ""), ("Translate the word to French.", "dog"),
                ("What is the opposite of hot?", "")]


def demo_reft_setup(model, num_layers: int, rank: int, positions: str, dtype=torch.float32,
                    dropout: float = 0.0, backend: str = "auto"):
    """LoReFT on every block output; untied ``f+l`` positions get two interventions per layer.

    Returns ``(reft_model, num_interventions, share_weights)``.
    """
    from . import LoreftIntervention, ReftConfig, get_reft_model
    from .dataset import parse_positions
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


def generate_text(reft_model, tokenizer, prompts, positions: str, num_interventions: int,
                  share_weights: bool = False, max_new_tokens: int = 20, intervene: bool = True):
    """Greedy generations for ``prompts`` (left-padded batch), with or without the interventions."""
    from .dataset import make_generation_inputs
    tokenizer.padding_side = "left"
    batch = make_generation_inputs(tokenizer, prompts, positions, num_interventions, share_weights,
                                   device=next(reft_model.model.parameters()).device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id)
    reft_model.eval()
    with torch.no_grad():
        if intervene:
            out = reft_model.generate(**batch, **kw)
        else:
            out = reft_model.model.generate(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"], **kw)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new], new


def op_timings(backends=("torch", "native", "triton"), batch: int = 4, seq_len: int = 256,
               dim: int = 256, rank: int = 8, n_positions: int = 14, repeats: int = 5) -> list:
    """Median forward+backward time of ``reft_kernels.ops.loreft`` per backend.

    Rows: ``(backend, milliseconds or None, note)``; an unavailable backend gets its reason.
    Triton on a CPU runs in its interpreter (slow by design, checked for correctness not speed).
    """
    import statistics
    import time as _time

    from . import ops
    from .ops.autograd import get_backend
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


def run_demo(output_dir: Optional[str] = None, epochs: int = 60, quick: bool = False, seed: int = 0,
             backend: str = "auto", ops: str = "all", log=print) -> dict:
    """Train a LoReFT on the shipped instruction set with a tiny Llama; see ``reft-kernels demo``.

    ``quick`` trains 2 epochs (for tests). Returns a dict of measurements.
    """
    import tempfile
    import time as _time

    import transformers
    from tqdm.auto import tqdm

    from . import ReftModel
    from .dataset import make_multiple_position_supervised_data_module
    from .trainer import ReftTrainerForCausalLM

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
        logging_steps=max(1, (2 if quick else epochs) * 6 // 10), report_to=[], save_strategy="no",
        use_cpu=True, seed=seed, weight_decay=0.0, disable_tqdm=False)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data)
    t_train = _time.perf_counter()
    trainer.train()
    train_s = _time.perf_counter() - t_train
    loss_after = dataset_loss()
    cut = 1.0 - loss_after / loss_before
    log(f"[4/6] trained in {train_s:.1f} s: dataset loss {loss_before:.3f} -> {loss_after:.3f} "
        f"({100 * cut:.0f}% lower)")

    after, after_ids = generate_text(reft_model, tokenizer, shown, positions, n_iv, share)
    for (ins, inp), b, a in zip(DEMO_PROMPTS, before, after):
        log(f"  Q: {ins}{' [' + inp + ']' if inp else ''}\n     before: {b}\n     after:  {a}")

    adapter = os.path.join(output_dir, "adapter")
    base_dir = os.path.join(output_dir, "base_model")
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    reft_model.save(adapter)
    write_run_info(output_dir, model=base_dir, positions=positions, num_interventions=n_iv,
                   share_weights=share, template="instruction")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    reloaded = ReftModel.load(adapter, fresh, backend=backend)
    again, again_ids = generate_text(reloaded, tokenizer, shown, positions, n_iv, share)
    identical = bool(torch.equal(after_ids, again_ids))
    log(f"[5/6] saved the adapter to {adapter}; reloaded it on a fresh copy of the base model: "
        f"generations {'identical' if identical else 'DIFFERENT'}")

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
            "generations_before": before, "generations_after": after, "output_dir": output_dir,
            "op_timings": timings}


RUN_INFO = "reft_run.json"


def write_run_info(directory: str, **info) -> str:
    """Write ``reft_run.json`` (base model path, positions, ...) used by ``reft-kernels generate``."""
    path = os.path.join(directory, RUN_INFO)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return path
