"""Does the learned LoReFT carry the emoji style to prompts it was not trained on? Per seed, per config.

pyreft's README quick start (the emoji chatbot) on SmolLM2-135M-Instruct: one LoReFT, rank 4, on
the block output of the middle layer (15 of 30) at the last prompt position, the ten README
examples verbatim (the full road-trip answer) in the model's chat template, 100 epochs of one
batch of 10, AdamW lr 4e-3 with linear decay to 0, no warmup, no weight decay, gradient-norm clip
1.0 (the HF Trainer defaults pyreft's ``ReftTrainerForCausalLM`` runs with), fp32, seed s.
Then greedy generation (the intervention on the prompt's last position, at prefill only, as
pyreft's ``generate(..., intervene_on_prompt=True)``; one left-padded batch per prompt set) for
the 10 training prompts and 10 unseen questions (their first ``--max-new-tokens``).

Configs (``--config``): ``pyreft`` (``pyreft.LoreftIntervention`` itself; run it with the parity
venv's python), ``pyreft_base`` (ours, ``pyreft_base=True``), ``compact`` / ``hartley`` (ours,
``completion=``), ``default`` (ours, no keyword: whatever the package default is).

Training loop, the same for every config, and equal in exact arithmetic to the Trainer's step
(HF's causal-LM loss: the mean cross-entropy over all label tokens of the batch; labels are the
answer tokens and the EOS): the intervention at position p (the last prompt token) changes
nothing before p, and every label is predicted from a position >= p, so the prompt's first p
tokens run once (their KV cache is kept, frozen) and each step runs only tokens p.. of each
example, unpadded (the Trainer pads the batch to the longest example, 7x the tokens here). The
intervention module is called on the gathered row (1, 1, d), as pyvene calls it.

Measures: final training loss (the last step's, as the Trainer logs it), exact training answers
(greedy decoding reproduces the answer and its EOS token for token, i.e. every label token is the
argmax under teacher forcing: one forward, no generation), and unseen questions answered in emojis only:
after removing keycaps (digit + U+FE0F? + U+20E3), whitespace and punctuation (Unicode category
P*), the answer is non-empty and holds no letter or number of any script (categories L*, N*).
Appends one JSON line per run to ``--out`` (default benchmarks/results/quickstart_generalisation.jsonl).

    OMP_NUM_THREADS=1 python benchmarks/bench_quickstart_generalisation.py --config compact --seed 0
    "$REFT_PARITY_VENV"/bin/python benchmarks/bench_quickstart_generalisation.py --config pyreft --seed 0
    python benchmarks/bench_quickstart_generalisation.py --summarise     # the tables
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
import unicodedata

from reft_kernels.compat.kv_cache import cache_kwargs, output_cache
from reft_kernels.jobs.prompts import PYREFT_QUICKSTART_EXAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "quickstart_generalisation.jsonl")
MODEL_DIR = os.path.expanduser("~/.cache/reft_kernels/smollm2-135m-instruct")
CONFIGS = ("pyreft", "pyreft_base", "compact", "hartley", "default")
EXAMPLES = PYREFT_QUICKSTART_EXAMPLES  # pyreft README, verbatim
UNSEEN = ["What is the capital of France?", "Which dog breed do you like best?",
          "Give me a recipe for pancakes.", "How do airplanes fly?", "Tell me a joke about computers.",
          "What should I eat for breakfast?", "Explain photosynthesis in simple terms.",
          "Who wrote Romeo and Juliet?", "How can I improve my sleep?", "What is your favourite movie?"]
_KEYCAP = re.compile("[0-9#*]\ufe0f?\u20e3")


def emoji_only(text: str) -> bool:
    """True when ``text`` holds something and, keycaps, whitespace and punctuation removed, no
    letter or number of any script (so emojis and other symbols only)."""
    rest = [c for c in _KEYCAP.sub("", text)
            if not c.isspace() and not unicodedata.category(c).startswith("P")]
    return bool(rest) and not any(unicodedata.category(c)[0] in "LN" for c in rest)


def make_intervention(config: str, d: int):
    import torch
    if config == "pyreft":
        import pyreft
        return pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=4, dtype=torch.float32)
    import reft_kernels
    extra = {"pyreft_base": {"pyreft_base": True}, "default": {}}.get(config, {"completion": config})
    iv = reft_kernels.LoreftIntervention(embed_dim=d, low_rank_dimension=4, dtype=torch.float32, **extra)
    got = getattr(iv.rotate_layer, "completion", "compact")   # before the option: always compact
    if "completion" in extra and got != config:
        raise SystemExit(f"this reft_kernels ({reft_kernels.__file__}) has no completion={config!r}")
    return iv


def run(config: str, seed: int, epochs: int, lr: float, max_new_tokens: int, threads: int,
        model_dir: str = MODEL_DIR) -> dict:
    import torch
    import transformers
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model.config.num_hidden_layers // 2
    d = model.config.hidden_size

    def chat(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    torch.manual_seed(seed)
    iv = make_intervention(config, d)
    params = [p for p in iv.parameters() if p.requires_grad]

    edit = {"at": None}   # position to edit in the current call (None: leave the call alone)

    def hook(module, args, output):
        at = edit["at"]
        if at is None:
            return output
        h = output[0] if isinstance(output, tuple) else output
        row = iv(h[:, at:at + 1])
        h = torch.cat([h[:, :at], row.to(h.dtype), h[:, at + 1:]], dim=1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)

    # data: pyreft's make_last_position_supervised_data_module (prompt, prompt + answer + EOS)
    examples, n_labels = [], 0
    for q, a in EXAMPLES:
        prompt = chat(q)
        p_len = len(tok(prompt)["input_ids"])
        ids = torch.tensor(tok(prompt + a + tok.eos_token)["input_ids"])
        p = p_len - 1
        with torch.no_grad():
            prefix = output_cache(model(input_ids=ids[None, :p], use_cache=True))
        examples.append((prefix, ids[p:]))
        n_labels += len(ids) - p_len

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (epochs - s) / epochs))
    losses, t0 = [], time.perf_counter()
    edit["at"] = 0
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for prefix, suffix in examples:
            logits = model(input_ids=suffix[None], **cache_kwargs(model, copy.deepcopy(prefix)), use_cache=True).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], suffix[1:], reduction="sum") / n_labels
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(total)
        if len(losses) % 10 == 0:
            print(f"epoch {len(losses)} loss {total:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    if hasattr(iv, "eval"):
        iv.eval()

    def generate(questions, max_new):
        """Greedy answers for a left-padded batch: the last prompt position is the last column."""
        tok.padding_side = "left"
        batch = tok([chat(q) for q in questions], return_tensors="pt", padding=True)
        calls = {"n": 0}

        def once(module, args):    # edit at prefill only (pyreft's intervene_on_prompt=True)
            calls["n"] += 1
            edit["at"] = batch["input_ids"].shape[1] - 1 if calls["n"] == 1 else None
        pre = model.model.layers[layer].register_forward_pre_hook(once)
        try:
            with torch.no_grad():
                out = model.generate(**batch, do_sample=False, max_new_tokens=max_new,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        finally:
            pre.remove()
            edit["at"] = None
        new = out[:, batch["input_ids"].shape[1]:]
        return [tok.decode(row, skip_special_tokens=True).strip() for row in new]

    t1 = time.perf_counter()
    with torch.no_grad():   # greedy reproduces answer + EOS iff every label token is the argmax
        edit["at"] = 0
        exact = [bool((model(input_ids=suffix[None], **cache_kwargs(model, copy.deepcopy(prefix)), use_cache=True)
                       .logits[0, :-1].argmax(-1) == suffix[1:]).all()) for prefix, suffix in examples]
    edit["at"] = None
    unseen_answers = generate(UNSEEN, max_new_tokens)
    handle.remove()
    return {
        "config": config, "seed": seed, "epochs": epochs, "lr": lr, "threads": threads,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "final_loss": losses[-1], "losses": [round(x, 5) for x in losses],
        "exact": sum(exact), "exact_per_example": exact, "n_train": len(EXAMPLES),
        "emoji_only_unseen": sum(map(emoji_only, unseen_answers)), "n_unseen": len(UNSEEN),
        "unseen_answers": dict(zip(UNSEEN, unseen_answers)),
        "train_s": round(train_s, 1), "generate_s": round(time.perf_counter() - t1, 1),
        "intervention": repr(iv), "completion": getattr(getattr(iv, "rotate_layer", None), "completion", None),
    }


def summarise(path: str) -> str:
    """Markdown: one row per run, then mean +- SD (sample, n - 1) per config."""
    import statistics
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = ["| config | seed | final loss | exact (of 10) | emoji-only unseen (of 10) |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["seed"], CONFIGS.index(r["config"]))):
        out.append(f"| {r['config']} | {r['seed']} | {r['final_loss']:.4f} | {r['exact']} | {r['emoji_only_unseen']} |")
    out += ["", "| config | seeds | final loss | exact | emoji-only unseen |", "|---|---:|---:|---:|---:|"]

    def ms(xs, f):
        return f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):{f}}" if len(xs) > 1 else f"{xs[0]:{f}}"
    for c in CONFIGS:
        rs = [r for r in rows if r["config"] == c]
        if rs:
            out.append(f"| {c} | {len(rs)} | {ms([r['final_loss'] for r in rs], '.4f')} | "
                       f"{ms([r['exact'] for r in rs], '.1f')} | {ms([r['emoji_only_unseen'] for r in rs], '.1f')} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=CONFIGS)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--summarise", action="store_true", help="print the tables of --out's runs and exit")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--model-dir", default=MODEL_DIR, help="the converted SmolLM2-135M-Instruct (reft-kernels fetch-model)")
    a = ap.parse_args(argv)
    if a.summarise:
        print(summarise(a.out))
        return
    if a.config is None or a.seed is None:
        ap.error("--config and --seed are required (or --summarise)")
    row = run(a.config, a.seed, a.epochs, a.lr, a.max_new_tokens, a.threads, a.model_dir)
    with open(a.out, "a") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({k: row[k] for k in ("config", "seed", "final_loss", "exact", "emoji_only_unseen",
                                          "train_s", "generate_s")}))


if __name__ == "__main__":
    main()
