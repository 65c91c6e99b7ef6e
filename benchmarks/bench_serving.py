"""Serving benchmark: N concurrent requests spread over A adapters on one small Llama (CPU).

``--engine hf`` (default, below): our hf engine against pyreft on a small random Llama.
``--engine vllm`` (run it in the vLLM venv): vLLM + the reft_kernels plugin against our hf engine,
pyreft and stock vLLM on the real model, with time to first token; see benchmarks/serving_vllm.py.

Work: N prompts of ``--prompt-len`` random tokens, request i for adapter ``i % A`` (LoReFT rank 4 on
``--layers``, position rule l1: the last prompt token), greedy, exactly ``--new-tokens`` new tokens
each (eos is disabled, so every method does the same number of decode steps). Throughput =
generated tokens / wall seconds for the whole set, median of ``--repeats``; the methods run
back to back in each repeat and the ratios are medians of per-repeat ratios (wall and CPU time).

Methods:
  mixed     our engine, the requests submitted concurrently to its queue: one batched generate
            with each row's own adapter (per-row adapter_ids); needs ReftModel named adapters
  grouped   our engine in grouped mode (baseline b): one single-adapter batched generate per
            adapter group, one group after another
  pyreft    baseline (a), pyreft 0.1.0 itself (its own venv, transformers 4.45.1, a persistent
            subprocess driven run by run): one pyreft ReftModel per adapter (all built beforehand,
            switching is free), one batched generate per adapter group, one group after another
  http      (N=16, A=16 only) the real server process, the requests sent concurrently with the
            openai client from N threads of this process: the mixed path plus HTTP/JSON and the
            client's own CPU use (on the same 2 cores)

    python benchmarks/bench_serving.py                         # the committed run
    python benchmarks/bench_serving.py --adapters 1 4 --requests 8 --repeats 1   # a smoke run

Writes benchmarks/results/serving.json and serving.png. The machine is shared: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the parity venv of .ci/pyreft_parity.sh (same variable, same default)
PYREFT_PYTHON = os.path.join(os.environ.get("REFT_PARITY_VENV", os.path.join(tempfile.gettempdir(), "reft-parity-venv")), "bin", "python")


def llama_config(a):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.hidden // 64,
                       num_key_value_heads=a.hidden // 64, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def workload(a, n):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(4, a.vocab, (a.prompt_len,), generator=g).tolist() for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# pyreft (runs under the 4.45.1 venv)
# ------------------------------------------------------------------------------------------------
def pyreft_worker(a):
    """A persistent worker: reads "N A" lines, answers one timed run each as a JSON line."""
    import pyreft
    from transformers import LlamaForCausalLM
    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM(llama_config(a))
    model.load_state_dict(torch.load(os.path.join(a.workdir, "base_state.pt")))
    model.eval()
    adapters = {}
    for line in sys.stdin:
        n, A = map(int, line.split())
        if A not in adapters:
            torch.manual_seed(0)
            adapters[A] = []
            for _ in range(A):
                reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                         "intervention": pyreft.LoreftIntervention(embed_dim=a.hidden, low_rank_dimension=4,
                                                                   dtype=torch.float32)} for layer in a.layers]
                rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
                rm.set_device("cpu")
                adapters[A].append(rm)
        groups = {}
        for i, p in enumerate(workload(a, n)):
            groups.setdefault(i % A, []).append(p)
        w0, c0, tokens = time.perf_counter(), time.process_time(), 0
        for adapter, rows in groups.items():   # one adapter group after another
            ids = torch.tensor(rows)   # same length: no padding needed
            locs = [[[len(r) - 1] for r in rows]] * len(a.layers)
            with torch.no_grad():
                _, out = adapters[A][adapter].generate(
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    unit_locations={"sources->base": (None, locs)}, intervene_on_prompt=True,
                    max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        print("RESULT", json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "tokens": tokens}),
              flush=True)


class PyreftProcess:
    """The pyreft worker in the 4.45.1 venv, driven one run at a time (so runs interleave with ours)."""

    def __init__(self, a):
        cmd = [PYREFT_PYTHON, os.path.abspath(__file__), "--pyreft-worker", "--workdir", a.workdir]
        for k in ("layers",):
            cmd += [f"--{k}", *map(str, getattr(a, k))]
        for k in ("hidden", "n_layers", "vocab", "prompt_len", "new_tokens", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": str(a.threads)})

    def run(self, n, A):
        self.proc.stdin.write(f"{n} {A}\n")
        self.proc.stdin.flush()
        while True:   # pyvene prints notices on stdout: skip to our line
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the pyreft worker died; run it by hand to see why")
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------
def prepare(a):
    """Base model (weights + word tokenizer) and max(A) adapters written to a.workdir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from reft_kernels import LoreftIntervention, ReftConfig, get_reft_model
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(a)).eval()
    torch.save(model.state_dict(), os.path.join(a.workdir, "base_state.pt"))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4, a.vocab)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", model_max_length=1024)
    base = os.path.join(a.workdir, "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    for i in range(max(A for _, A in a.grid)):
        reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                 "intervention": LoreftIntervention(embed_dim=a.hidden, low_rank_dimension=4, dtype=torch.float32)}
                for layer in a.layers]
        rm = get_reft_model(model, ReftConfig(representations=reps))
        run = os.path.join(a.workdir, f"a{i}")
        rm.save(os.path.join(run, "adapter"))
        with open(os.path.join(run, "reft_run.json"), "w") as f:
            json.dump({"model": base, "positions": "l1", "num_interventions": len(reps), "share_weights": False,
                       "template": "none"}, f)
        rm.unload()
    return base


class EngineRunner:
    """Our engine (mode mixed or grouped) with A adapters loaded, its queue running."""

    def __init__(self, a, base, mode, n, A):
        from concurrent.futures import ThreadPoolExecutor

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reft_kernels.serving import Engine
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        model.generation_config.eos_token_id = None
        self.engine = Engine(model, AutoTokenizer.from_pretrained(base), mode=mode, max_batch_size=max(n, 1),
                             batch_window_s=a.window_ms / 1000, backend=a.backend)
        self.engine.eos_ids = []   # every request generates exactly new_tokens tokens
        for i in range(A):
            self.engine.load_adapter(f"a{i}", os.path.join(a.workdir, f"a{i}"))
        self.engine.warmup()
        self.engine.start()
        self.a, self.n, self.A, self.runs = a, n, A, 0
        self.prompts = workload(a, n)
        self.pool = ThreadPoolExecutor(max_workers=n)

    def run(self):
        from reft_kernels.serving import GenerationRequest, SamplingParams
        reqs = [GenerationRequest(p, f"a{i % self.A}", SamplingParams(max_tokens=self.a.new_tokens))
                for i, p in enumerate(self.prompts)]
        w0, c0 = time.perf_counter(), time.process_time()
        results = [f.result() for f in list(self.pool.map(self.engine.submit, reqs))]
        self.runs += 1
        return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                "tokens": sum(len(r.token_ids) for r in results)}

    def close(self):
        stats = self.engine.stats
        self.pool.shutdown()
        self.engine.close()
        return {"generate_calls_per_run": stats["generate_calls"] / max(self.runs, 1),
                "batches_per_run": stats["batches"] / max(self.runs, 1)}


class HttpRunner:
    """The real server process (mixed batching) and the openai client sending N requests from N threads."""

    def __init__(self, a, base, n, A):
        import socket
        import urllib.request
        from concurrent.futures import ThreadPoolExecutor

        import openai
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [sys.executable, "-m", "reft_kernels.serving", "--model", base, "--port", str(self.port), "--backend",
                a.backend, "--max-batch-size", str(n), "--batch-window-ms", str(a.window_ms), "--log-level", "warning"]
        for i in range(A):
            args += ["--adapter", f"a{i}={os.path.join(a.workdir, f'a{i}')}"]
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(a.threads)}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env)
        for _ in range(2400):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited; run it by hand to see why")
                time.sleep(0.25)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        self.a, self.n, self.A, self.prompts = a, n, A, workload(a, n)
        self.pool = ThreadPoolExecutor(max_workers=n)
        self.run()   # warm-up
        self.stats0 = self._stats()

    def _stats(self):
        import urllib.request
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/debug/stats"))

    def _call(self, i):   # the base model's config has no eos: every request gets new_tokens tokens
        r = self.client.completions.create(model=f"a{i % self.A}", prompt=self.prompts[i],
                                           max_tokens=self.a.new_tokens, temperature=0)
        return r.usage.completion_tokens

    def run(self):
        w0 = time.perf_counter()
        tokens = sum(self.pool.map(self._call, range(self.n)))
        return {"wall": time.perf_counter() - w0, "tokens": tokens}

    def close(self, runs):
        stats = self._stats()
        self.pool.shutdown()
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return {"batches_per_run": (stats["batches"] - self.stats0["batches"]) / runs,
                "generate_calls_per_run": (stats["generate_calls"] - self.stats0["generate_calls"]) / runs}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"mixed": ("C0", "o"), "grouped": ("C1", "s"), "pyreft": ("C3", "^"), "http": ("C2", "*")}
    for n in sorted({r["requests"] for r in result["rows"]}):
        for method, (color, marker) in styles.items():
            pts = [(r["adapters"], r[method]["tokens_per_s"]) for r in result["rows"]
                   if r["requests"] == n and method in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, marker=marker, linestyle="-" if n == 16 else "--",
                        label=f"{method}, N={n}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("adapters A (requests spread round-robin)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Serving N concurrent requests over A ReFT adapters (shared CPU)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(runs):
    """Median wall and CPU seconds of a method's runs and tokens/s from them."""
    out = {"tokens": runs[0]["tokens"], "wall_s": [round(r["wall"], 4) for r in runs]}
    out["tokens_per_s"] = out["tokens"] / statistics.median(r["wall"] for r in runs)
    if all("cpu" in r for r in runs):
        out["cpu_s"] = [round(r["cpu"], 4) for r in runs]
        out["tokens_per_cpu_s"] = out["tokens"] / statistics.median(r["cpu"] for r in runs)
    return out


def paired_ratio(ours, theirs, key):
    """Median over repeats of theirs[key] / ours[key] (run i of each ran back to back)."""
    return statistics.median(t[key] / o[key] for o, t in zip(ours, theirs))


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    engine, rest = pre.parse_known_args()
    if engine.engine == "vllm":
        sys.path.insert(0, HERE)
        import serving_vllm
        return serving_vllm.main(rest)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: this benchmark; vllm: benchmarks/serving_vllm.py (in the vLLM venv)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, nargs="+", default=[16, 64],
                   help="N values; each is run with every A <= N")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="intervened layers")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-pyreft", action="store_true")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving"))
    p.add_argument("--pyreft-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.pyreft_worker:
        return pyreft_worker(a)

    sys.path.insert(0, ROOT)
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    a.grid = [(n, A) for n in a.requests for A in a.adapters if A <= n]
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_serving_")
    base = prepare(a)
    pyreft = PyreftProcess(a) if not a.no_pyreft and os.path.exists(PYREFT_PYTHON) else None
    modes = ["mixed", "grouped"]
    ours = modes[0]
    rows = []
    for n, A in a.grid:
        runners = {m: EngineRunner(a, base, m, n, A) for m in modes}
        http = HttpRunner(a, base, n, A) if not a.no_http and n == 16 and A == 16 and "mixed" in modes else None
        runs = {m: [] for m in modes + (["pyreft"] if pyreft else []) + (["http"] if http else [])}
        if pyreft:
            pyreft.run(n, A)   # warm-up (builds its A adapters)
        for _ in range(a.repeats):   # interleaved: the methods see the same machine load
            for m in modes:
                runs[m].append(runners[m].run())
            if pyreft:
                runs["pyreft"].append(pyreft.run(n, A))
            if http:
                runs["http"].append(http.run())
        row = {"requests": n, "adapters": A}
        for m in runs:
            row[m] = summarize(runs[m])
        for m in modes:
            row[m].update(runners[m].close())
        if http:
            row["http"].update(http.close(a.repeats))
        row["ratios"] = {}
        for other in [m for m in modes if m != ours] + (["pyreft"] if pyreft else []):
            row["ratios"][f"{ours}_vs_{other}_wall"] = paired_ratio(runs[ours], runs[other], "wall")
            row["ratios"][f"{ours}_vs_{other}_cpu"] = paired_ratio(runs[ours], runs[other], "cpu")
        if http and pyreft:
            row["ratios"]["http_vs_pyreft_wall"] = paired_ratio(runs["http"], runs["pyreft"], "wall")
        rows.append(row)
        print(json.dumps({"N": n, "A": A, **{m: round(row[m]["tokens_per_s"], 1) for m in
                                             ("mixed", "grouped", "pyreft", "http") if m in row},
                          **{k: round(v, 2) for k, v in row["ratios"].items()}}), flush=True)
    if pyreft:
        pyreft.close()
    result = {"settings": {k: v for k, v in vars(a).items() if k not in ("pyreft_worker", "workdir", "out")},
              "ours": ours if ours == "mixed" else "grouped (ReftModel named adapters not available)",
              "method": "each (N, A): the methods run back to back, repeats times; tokens_per_s uses the median "
                        "wall time; ratios are medians of the per-repeat ratios (wall and process CPU time)",
              "machine": {"cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "pyreft_transformers": "4.45.1",
                          "note": "shared 2-core machine with other jobs running: compare ratios, not absolutes"},
              "rows": rows}
    sys.path.insert(0, HERE)
    from serving_vllm import write_results   # stdlib-only at import; vLLM loads only in its children
    write_results(result, a.out, plot)


if __name__ == "__main__":
    main()
