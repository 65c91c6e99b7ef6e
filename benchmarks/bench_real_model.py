"""pyreft 0.1.0 vs reft_kernels on a real model: pyreft's README quick start, only the import changed.

Two recipes on SmolLM2-135M-Instruct (``reft-kernels fetch-model``), the ten README examples
verbatim in the model's chat template, ``ReftTrainerForCausalLM`` with batch 10, lr 4e-3, same seed:

* ``quickstart`` (pyreft's README, the emoji chatbot): one LoReFT r=4 on the block output of the
  middle layer at the last prompt position (``make_last_position_supervised_data_module``);
* ``f7l7`` (the paper's LoReFT recipe): LoReFT r=4 on 4 layers at the first 7 and the last 7
  prompt positions, untied (8 interventions), ``make_multiple_position_supervised_data_module``.

Each implementation runs in its own process and environment:

* ``pyreft``: ``import pyreft`` in the parity venv (torch 2.13, transformers 4.45.1, pyvene 0.1.8);
* ``ours``: ``import reft_kernels as pyreft`` in the same venv (same transformers, a fair
  comparison) and, with ``--ours-latest``, also in the main python (transformers 5.x);
* ``ours_pyreft_base``: the same with ``LoreftIntervention(..., pyreft_base=True)``, which keeps
  pyreft's random d x d completion of R: pyreft's exact training path from the same seed (the
  default compact base has the same initial R but another completion: the same statistics,
  another path).

``--matrix`` runs six engines in one go, interleaved: pyreft 0.1.0 fp32 and bf16, ours fp32, fp32 +
the frozen-prefix cache, bf16 and bf16 + the cache (ours always with logits at labelled positions
and length groups without padding, the trainer's defaults), all in the parity venv (transformers 4.45.1), one thread each.
The processes hold their models side by side and take turns (one training step, one paired
timing round or one generation pair at a time), so each sees the same machine load; the load
average is recorded every turn. Written to ``real_model_matrix[_f7l7].json`` and ``.png``.

Measured per implementation: time per training step (the Trainer's whole step, median over
steps after the first); then on one batch, alternating ``--pairs`` times (default 6; the training
steps warm up; in ``--matrix`` only ours' runs, the base being the same model) so both see the same load, the
ReFT forward+backward and the frozen base model's (a zero-cost trainable hook at the same layers:
the floor any ReFT engine pays; their paired ratio is the engine's overhead); peak RSS; time per
generated token with the adapter and without it (greedy, 32 tokens, 6 alternating pairs; the
paired ratio's median); the loss curve; the greedy answers after training.
Writes ``benchmarks/results/real_model[_f7l7].json`` and ``.png``.

    python benchmarks/bench_real_model.py --ours-latest               # quick start, 100 steps each
    python benchmarks/bench_real_model.py --recipe f7l7 --steps 20    # the paper's recipe
    python benchmarks/bench_real_model.py --steps 10                  # a quick look
    python benchmarks/bench_real_model.py --matrix --steps 20         # the six engines, interleaved

Numbers taken on a shared 2-core CPU vary with the other jobs: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from reft_kernels.jobs.prompts import PYREFT_QUICKSTART_EXAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the parity venv of .ci/pyreft_parity.sh (the same variable); --pyreft-python overrides it
VENV_PYTHON = os.path.join(os.environ["REFT_PARITY_VENV"], "bin", "python") if os.environ.get("REFT_PARITY_VENV") \
    else None
EXAMPLES = PYREFT_QUICKSTART_EXAMPLES  # pyreft README, verbatim
HELD_OUT = ["What is the capital of France?", "Which dog breed do you like best?"]


# ------------------------------------------------------------------------------------------------
# child: one implementation
# ------------------------------------------------------------------------------------------------
def _rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Baton:
    """A child's side of the interleaving: ``turn()`` says "ready" and waits for the parent's "go"
    (``--baton R,W``: the file descriptors of the two pipes); without a baton it does nothing."""

    def __init__(self, spec=None):
        self.pipes = None
        if spec:
            r, w = (int(x) for x in spec.split(","))
            self.pipes = (os.fdopen(r, "r"), os.fdopen(w, "w"))

    def turn(self):
        if self.pipes is not None:
            self.pipes[1].write("ready\n")
            self.pipes[1].flush()
            if not self.pipes[0].readline():   # the parent is gone: stop rather than run unpaired
                raise SystemExit("bench_real_model: the parent of this interleaved run exited")


RECIPES = {
    # name: (layers as fractions of the depth, positions; f/l groups untied)
    "quickstart": ((1 / 2,), "l1"),
    "f7l7": ((1 / 5, 2 / 5, 3 / 5, 4 / 5), "f7+l7"),
}


def child(impl: str, model_dir: str, steps: int, seed: int, threads: int, recipe: str = "quickstart",
          dtype: str = "float32", prefix_cache: bool = False, gen_rounds: int = 3, baton: Baton = None,
          pairs: int = 6) -> dict:
    import statistics

    import torch
    import transformers
    if impl == "pyreft":
        import pyreft
    else:
        import reft_kernels as pyreft
    baton = baton or Baton()
    baton.turn()
    extra = {"pyreft_base": True} if impl == "ours_pyreft_base" else {}
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(getattr(torch, dtype)).eval()
    fractions, positions = RECIPES[recipe]
    layers = [int(model.config.num_hidden_layers * f) for f in fractions]
    d = model.config.hidden_size

    def chat(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    # ---- pyreft README quick start (only the import differs) ----
    # ---- the recipe (only the import differs) ----
    torch.manual_seed(seed)
    site_layers = layers if positions == "l1" else layers + layers   # untied: f group, then l group
    # pyreft's LoReFT cannot take a bf16 base with fp32 weights (a dtype mismatch in its matmul), so a
    # bf16 pyreft run keeps its README's setting: the intervention in bf16 too. Ours stays fp32.
    iv_dtype = torch.bfloat16 if impl == "pyreft" and dtype == "bfloat16" else torch.float32
    reft_config = pyreft.ReftConfig(representations=[{
        "layer": layer, "component": "block_output", "low_rank_dimension": 4,
        "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=4, dtype=iv_dtype, **extra)}
        for layer in site_layers])
    reft_model = pyreft.get_reft_model(model, reft_config)
    prompts, answers_train = [chat(q) for q, _ in EXAMPLES], [a for _, a in EXAMPLES]
    if positions == "l1":
        data_module = pyreft.make_last_position_supervised_data_module(tok, model, prompts, answers_train)
    else:
        data_module = pyreft.make_multiple_position_supervised_data_module(
            tok, model, prompts, answers_train, positions=positions, num_interventions=len(site_layers),
            share_weights=False)
    args = transformers.TrainingArguments(
        num_train_epochs=steps, output_dir=tempfile.mkdtemp(prefix=f"bench_real_{impl}_"),
        per_device_train_batch_size=10, learning_rate=4e-3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True)

    step_times, t = [], {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            baton.turn()
            t["s"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - t["s"])

    cache_kw = {} if impl == "pyreft" else {"prefix_cache": prefix_cache}   # ours: on by default, so always said
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, **data_module, **cache_kw)
    trainer.add_callback(Timer())
    rss_before = _rss_mb()
    trainer.train()
    peak_rss = _rss_mb("VmHWM")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]

    # ---- paired cost on one batch, alternating so both see the same machine load: the ReFT
    # forward+backward (the trainer's own loss) vs the floor, the frozen base's forward+backward
    # with a zero-cost trainable hook at the same layers (what any ReFT engine must pay) ----
    batch = data_module["data_collator"]([data_module["train_dataset"][i] for i in range(len(EXAMPLES))])
    scale = torch.nn.Parameter(torch.zeros(()))
    cache = None
    if prefix_cache:   # the trainer's cache is gone after train(): time the paired pass with one of its own
        from reft_kernels.model.prefix_cache import PrefixCache
        cache = PrefixCache(reft_model)
        cache.install()

    def base_fwd_bwd():
        handles = [model.model.layers[layer].register_forward_hook(
            lambda m, i, o: ((o[0] + scale.to(o[0].dtype),) + tuple(o[1:])) if isinstance(o, tuple)
            else o + scale.to(o.dtype)) for layer in layers]
        if cache is not None:
            cache.paused = True   # the floor is the whole frozen base
        try:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"]).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
            if cache is not None:
                cache.paused = False

    if impl != "pyreft":   # as in the trainer's steps: the LM head at labelled positions only
        reft_model.labelled_logits = True

    def reft_fwd_bwd():
        trainer.compute_loss(reft_model, dict(batch)).backward()

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def median(xs):
        xs = list(xs)
        return statistics.median(xs) if xs else None

    reft_times, base_times = [], []
    if pairs and cache is not None:   # the training steps warmed everything up but this cache: fill it
        baton.turn()
        reft_fwd_bwd()
    for i in range(pairs):
        baton.turn()
        reft_times.append(timed(reft_fwd_bwd))
        base_times.append(timed(base_fwd_bwd))
    cache_hits = cache.hits if cache is not None else None
    if cache is not None:
        cache.remove()

    # ---- generation: time per token with and without the adapter; answers ----
    def generate(q, intervene, n=32):
        ids = tok(chat(q), return_tensors="pt")
        prompt_len = ids["input_ids"].shape[1]
        if positions == "l1":
            locations = [[[prompt_len - 1]]]
        else:   # the data module's own rule, one prompt
            locations = [[per] for per in pyreft.get_intervention_locations(
                last_position=prompt_len, positions=positions, num_interventions=len(site_layers),
                share_weights=False)]
        kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        with torch.no_grad():
            if intervene:
                _, out = reft_model.generate({"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]},
                                             unit_locations={"sources->base": (None, locations)},
                                             intervene_on_prompt=True, **kw)
            else:
                out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], **kw)
        dt = time.perf_counter() - t0
        new = out[0, ids["input_ids"].shape[1]:]
        return dt / max(len(new), 1), tok.decode(new, skip_special_tokens=True)

    for iv in reft_model.interventions.values():   # pyreft never switches its interventions to eval
        (iv[0] if isinstance(iv, (list, tuple)) else iv).eval()
    gen_pairs, answers = [], {}
    if gen_rounds:   # --gen-rounds 0: no generation (bench_generate_bf16.py times it on its own)
        baton.turn()
        generate(HELD_OUT[0], True, 4)
        for q in HELD_OUT * gen_rounds:   # alternating
            baton.turn()
            gen_pairs.append((generate(q, True)[0], generate(q, False)[0]))
        baton.turn()
        answers = {q: generate(q, True, 24)[1] for q in [EXAMPLES[0][0]] + HELD_OUT}

    return {"impl": impl, "dtype": dtype, "intervention_dtype": str(iv_dtype).replace("torch.", ""),
            "prefix_cache": prefix_cache, "paired_cache_hits": cache_hits,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": threads, "steps": len(step_times), "recipe": recipe, "layers": layers,
            "positions": positions, "interventions": len(site_layers),
            "step_s_median": statistics.median(step_times[1:] or step_times),
            "reft_fwd_bwd_s_median": median(reft_times), "base_fwd_bwd_s_median": median(base_times),
            "reft_over_base_paired_median": median(r / b for r, b in zip(reft_times, base_times)),
            "peak_rss_mb": peak_rss, "rss_before_train_mb": rss_before,
            "step_s_all": step_times,
            "gen_s_per_token_adapter": median(a for a, _ in gen_pairs),
            "gen_s_per_token_base": median(b for _, b in gen_pairs),
            "gen_adapter_over_base_paired_median": median(a / b for a, b in gen_pairs),
            "losses": losses, "final_loss": losses[-1] if losses else None, "answers": answers}


# ------------------------------------------------------------------------------------------------
# parent: run each implementation, write JSON + PNG
# ------------------------------------------------------------------------------------------------
def _command(python, impl, args, config, out):
    dtype, cache = config.get("dtype", "float32"), config.get("cache", False)
    pairs = config.get("pairs", args.pairs)
    return [python, os.path.abspath(__file__), "--child", impl, "--model", args.model, "--steps", str(args.steps),
            "--seed", str(args.seed), "--threads", str(args.threads), "--recipe", args.recipe, "--child-out", out,
            "--dtype", dtype, "--gen-rounds", str(args.gen_rounds), "--pairs", str(pairs)] + \
        (["--prefix-cache"] if cache else [])


def _run(python, impl, args, config=None) -> dict:
    """One child run; ``config``: {"dtype": ..., "cache": bool}."""
    out = tempfile.mktemp(prefix=f"bench_real_{impl}_", suffix=".json")
    print(f"running {impl} with {python} ...", flush=True)
    proc = subprocess.run(_command(python, impl, args, config or {}, out), env={**os.environ, "PYTHONPATH": ROOT},
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed (exit {proc.returncode})")
    with open(out) as f:
        return json.load(f)


def _run_interleaved(runs, args, loads: list) -> list:
    """All runs at once, one turn at a time (see :class:`Baton`); ``loads`` gets the 1-min load average
    at every turn. Returns the results in the order of ``runs``."""
    children = []
    for python, impl, config in runs:
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        out = tempfile.mktemp(prefix=f"bench_real_{impl}_", suffix=".json")
        cmd = _command(python, impl, args, config, out) + ["--baton", f"{go_r},{ready_w}"]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, pass_fds=(go_r, ready_w))
        os.close(go_r)
        os.close(ready_w)
        children.append({"proc": proc, "out": out, "go": os.fdopen(go_w, "w"), "ready": os.fdopen(ready_r, "r"),
                         "impl": impl})
    for c in children:
        c["pending"] = c["ready"].readline()
    alive = list(children)
    while alive:
        for c in list(alive):
            if not c["pending"]:            # it has finished (or failed)
                alive.remove(c)
                continue
            loads.append(os.getloadavg()[0])
            c["go"].write("go\n")
            c["go"].flush()
            c["pending"] = c["ready"].readline()   # it runs alone until its next turn
    results = []
    for c in children:
        if c["proc"].wait() != 0:
            raise SystemExit(f"{c['impl']} failed (exit {c['proc'].returncode})")
        with open(c["out"]) as f:
            results.append(json.load(f))
    return results


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for r in results:
        label = f"{r['label']} (tf {r['transformers']})"
        style = "--" if r["impl"] == "ours_pyreft_base" else ("-" if r["impl"] == "ours" else ":")
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=label, linewidth=1.6)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title(f"emoji LoReFT ({results[0]['recipe']}) on SmolLM2-135M-Instruct")
    a.legend()
    a.grid(alpha=0.3)
    names = [f"{r['label'].replace(' ', chr(10))}{chr(10)}tf {r['transformers']}" for r in results]
    x = range(len(results))
    b.bar([i - 0.27 for i in x], [r["step_s_median"] for r in results], 0.27, label="Trainer step (median)")
    b.bar(list(x), [r["reft_fwd_bwd_s_median"] or 0 for r in results], 0.27, label="ReFT fwd+bwd (paired)")
    b.bar([i + 0.27 for i in x], [r["base_fwd_bwd_s_median"] or 0 for r in results], 0.27,
          label="frozen base fwd+bwd (paired)")
    b.set_xticks(list(x))
    b.set_xticklabels(names, fontsize=7)
    b.set_ylabel("seconds (median; shared 2-core CPU)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def _round(x, digits):
    return None if x is None else round(x, digits)


def _fp32_twin(r, results):
    """The fp32 run without the cache of the same engine (what a bf16 run's final loss is held to)."""
    return next((x for x in results if x["impl"] == r["impl"] and x["dtype"] == "float32" and not x["prefix_cache"]),
                None)


def _base_s(r, results):
    """The frozen base's fwd+bwd in r's dtype: r's own, or (a --matrix pyreft run times none: the base
    is the same HF model in the same venv) the first run of that dtype that timed it."""
    if r["base_fwd_bwd_s_median"] is not None:
        return r["base_fwd_bwd_s_median"]
    return next((x["base_fwd_bwd_s_median"] for x in results
                 if x["dtype"] == r["dtype"] and x["base_fwd_bwd_s_median"] is not None), None)


def summary(results) -> list:
    """One row per run: the ratios the targets are stated in (pyreft = the first run)."""
    ref = results[0]
    return [{"run": f"{r['label']} (tf {r['transformers']})",
             "step_s": round(r["step_s_median"], 3),
             "reft_over_base_fwd_bwd": _round(r["reft_over_base_paired_median"], 3),
             "step_over_base_fwd_bwd": _round(r["step_s_median"] / _base_s(r, results), 3)
             if _base_s(r, results) else None,
             "step_over_pyreft_step": round(r["step_s_median"] / ref["step_s_median"], 3),
             "gen_adapter_over_base_per_token": _round(r["gen_adapter_over_base_paired_median"], 3),
             "peak_rss_mb": round(r["peak_rss_mb"]),
             "final_loss": r["final_loss"],
             "final_loss_rel_to_fp32": round(r["final_loss"] / _fp32_twin(r, results)["final_loss"] - 1, 4)
             if _fp32_twin(r, results) else None,
             "gen_s_per_token_adapter": _round(r["gen_s_per_token_adapter"], 4),
             "gen_s_per_token_base": _round(r["gen_s_per_token_base"], 4),
             "max_abs_loss_diff_vs_pyreft": round(max(abs(x - y) for x, y in zip(r["losses"], ref["losses"])), 6)}
            for r in results]


def targets(results) -> dict:
    """The issue's targets, read off a --matrix run, for ``ours bf16+cache`` (the issue's row) and
    ``ours fp32+cache`` (the fastest row on a CPU without native bf16); {} where a run is missing."""
    by = {r["label"]: r for r in results}
    ref = by.get("pyreft fp32")
    out = {}
    for label in ("ours bf16+cache", "ours fp32+cache"):
        fast = by.get(label)
        if fast is None or ref is None:
            continue
        dtype = "bf16" if fast["dtype"] == "bfloat16" else "fp32"
        twin = _fp32_twin(fast, results)
        row = {"step_over_pyreft_fp32_step": fast["step_s_median"] / ref["step_s_median"],
               f"step_over_base_{dtype}_fwd_bwd": fast["step_s_median"] / fast["base_fwd_bwd_s_median"],
               "final_loss_rel_to_ours_fp32": fast["final_loss"] / twin["final_loss"] - 1 if twin else None}
        row["met"] = {"step <= 0.35 x pyreft fp32": row["step_over_pyreft_fp32_step"] <= 0.35,
                      f"step <= 0.8 x frozen base {dtype} fwd+bwd": row[f"step_over_base_{dtype}_fwd_bwd"] <= 0.8,
                      "final loss within 2% of fp32": twin is not None
                      and abs(row["final_loss_rel_to_ours_fp32"]) <= 0.02}
        out[label] = row
    return out


def _cpu_bf16_flags() -> tuple:
    """The CPU's native bf16 flags (avx512_bf16, amx_bf16); () means bf16 is emulated (slow)."""
    sys.path.insert(0, ROOT)
    from reft_kernels.model.precision import cpu_bf16_flags
    return tuple(cpu_bf16_flags())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: reft-kernels fetch-model's)")
    p.add_argument("--steps", type=int, default=100, help="training steps (= epochs: one batch of 10)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="quickstart",
                   help="quickstart: 1 layer, last position (pyreft README); f7l7: 4 layers, f7+l7 (the paper)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pyreft-python", default=VENV_PYTHON,
                   help="python with pyreft 0.1.0 installed (default: $REFT_PARITY_VENV/bin/python)")
    p.add_argument("--pairs", type=int, default=6,
                   help="paired timing rounds of ReFT vs frozen-base fwd+bwd after training (--matrix: ours only)")
    p.add_argument("--ours-latest", action="store_true", help="also run ours under the main python")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/real_model[_f7l7].json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the base model's dtype for every run (--matrix runs both)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="ours: cache the frozen layers below the lowest intervention (reft_kernels.model.prefix_cache)")
    p.add_argument("--gen-rounds", type=int, default=3,
                   help="generation timing: pairs per held-out question (0: no generation)")
    p.add_argument("--matrix", action="store_true",
                   help="pyreft fp32 and bf16; ours fp32, fp32 + prefix cache, bf16, bf16 + cache; one run (parity venv)")
    p.add_argument("--child", choices=["pyreft", "ours", "ours_pyreft_base"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--baton", help=argparse.SUPPRESS)
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of a results JSON and exit")
    args = p.parse_args(argv)
    if args.plot_only:   # redraw the PNG of a written JSON
        with open(args.plot_only) as f:
            _plot(json.load(f)["results"], os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    if args.child:
        result = child(args.child, args.model, args.steps, args.seed, args.threads, args.recipe, args.dtype,
                       args.prefix_cache, args.gen_rounds, Baton(args.baton), args.pairs)
        with open(args.child_out, "w") as f:
            json.dump(result, f, ensure_ascii=False)
        return 0
    if args.out is None:
        suffix = ("_matrix" if args.matrix else "") + ("" if args.recipe == "quickstart" else "_" + args.recipe)
        args.out = os.path.join(ROOT, "benchmarks", "results", f"real_model{suffix}.json")
    if args.pyreft_python is None:
        p.error("pass --pyreft-python (a python with pyreft 0.1.0) or set REFT_PARITY_VENV to its venv")
    if args.model is None:
        sys.path.insert(0, ROOT)
        from reft_kernels.base_models.real import fetch_model
        args.model = fetch_model()
    same = {"dtype": args.dtype, "cache": args.prefix_cache}
    runs = [("pyreft 0.1.0", args.pyreft_python, "pyreft", same), ("reft_kernels", args.pyreft_python, "ours", same),
            ("reft_kernels pyreft_base", args.pyreft_python, "ours_pyreft_base", same)]
    if args.ours_latest:
        runs += [("reft_kernels", sys.executable, "ours", same),
                 ("reft_kernels pyreft_base", sys.executable, "ours_pyreft_base", same)]
    if args.matrix:
        f32, b16 = {"dtype": "float32"}, {"dtype": "bfloat16"}
        timed_once = {"pairs": 0}   # the frozen base is the same model in the same venv: timed in ours' runs
        runs = [("pyreft fp32", args.pyreft_python, "pyreft", {**f32, **timed_once}),
                ("pyreft bf16", args.pyreft_python, "pyreft", {**b16, **timed_once}),
                ("ours fp32", args.pyreft_python, "ours", f32),
                ("ours fp32+cache", args.pyreft_python, "ours", {**f32, "cache": True}),
                ("ours bf16", args.pyreft_python, "ours", b16),
                ("ours bf16+cache", args.pyreft_python, "ours", {**b16, "cache": True})]
    loads = [os.getloadavg()[0]]
    if args.matrix:
        results = _run_interleaved([(python, impl, dict(extra)) for _, python, impl, extra in runs], args, loads)
    else:
        results = [_run(python, impl, args, dict(extra)) for _, python, impl, extra in runs]
    loads.append(os.getloadavg()[0])
    for (label, *_), r in zip(runs, results):
        r["label"] = label
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}, ensure_ascii=False, indent=1), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    load = {"start": loads[0], "end": loads[-1], "median": statistics.median(loads), "max": max(loads)}
    with open(args.out, "w") as f:
        json.dump({"recipe": args.recipe, "model": os.path.basename(os.path.normpath(args.model)),
                   "steps": args.steps, "seed": args.seed,
                   "interleaved": args.matrix, "machine": "shared 2-core CPU (other jobs running)",
                   "cpu_native_bf16_flags": list(_cpu_bf16_flags()),
                   "load_average_1min": load, "summary": summary(results), "targets": targets(results),
                   "results": results},
                  f, ensure_ascii=False, indent=1)
    print(f"load average (1 min) during the run: {load}")
    print(json.dumps(targets(results), indent=1))
    for row in summary(results):
        print(row)
    print(f"wrote {args.out}")
    _plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
