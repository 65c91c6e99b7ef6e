"""Generation time per token with a bf16 base: the adapter against the base model alone (issue 18).

SmolLM2-135M-Instruct (``reft-kernels fetch-model``) in fp32 and in bf16, each wrapped once with
the quick start's adapter (LoReFT r=4, block output of layer 15, the last prompt position; the
weights as initialised: the cost does not depend on their values). Greedy decoding of
``--tokens`` new tokens (no early stop) for a chat prompt, one thread, with the KV cache. The four
cases -- bf16 adapter, bf16 base, fp32 adapter, fp32 base -- alternate round by round, so each
round's ratios compare runs under the same machine load; reported are medians over rounds of
the seconds per generated token (prompt prefill included, amortised) and of the per-round ratios.

    python benchmarks/bench_generate_bf16.py [--rounds 8] [--tokens 32]

Writes ``benchmarks/results/generate_bf16.json``. A shared machine's load shifts the seconds;
the paired ratios are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is the capital of France?", "Which dog breed do you like best?", "Who are you?"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: reft-kernels fetch-model's)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate_bf16.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    import transformers

    import reft_kernels as rk
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if args.model is None:
        from reft_kernels.base_models.real import fetch_model
        args.model = fetch_model()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    cases = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model).to(dtype).eval()
        torch.manual_seed(0)
        reft = rk.get_reft_model(model, rk.ReftConfig(representations=[{
            "layer": model.config.num_hidden_layers // 2, "component": "block_output", "low_rank_dimension": 4,
            "intervention": rk.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                                  dtype=torch.float32)}]))
        reft.eval()
        cases[name] = (model, reft)

    def run(name, adapter, question):
        model, reft = cases[name]
        ids = tok(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True), return_tensors="pt")
        kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        with torch.no_grad():
            if adapter:
                out = reft.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                    unit_locations={"sources->base": (None, [[[ids["input_ids"].shape[1] - 1]]])},
                                    **kw)
            else:
                out = model.generate(**ids, **kw)
        new = out.shape[1] - ids["input_ids"].shape[1]
        return (time.perf_counter() - t0) / new

    order = [("bf16", True), ("bf16", False), ("fp32", True), ("fp32", False)]
    times = {f"{n}_{'adapter' if a else 'base'}": [] for n, a in order}
    loads = [os.getloadavg()[0]]
    for i in range(args.rounds + 1):
        question = PROMPTS[i % len(PROMPTS)]
        for n, a in order:
            t = run(n, a, question)
            if i:   # round 0 warms up
                times[f"{n}_{'adapter' if a else 'base'}"].append(t)
        loads.append(os.getloadavg()[0])

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {"model": os.path.basename(os.path.normpath(args.model)), "threads": 1, "new_tokens": args.tokens,
              "rounds": args.rounds, "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": "shared 2-core CPU (other jobs running)",
              "load_average_1min": {"start": loads[0], "end": loads[-1], "median": statistics.median(loads)},
              "ms_per_token_median": {k: 1e3 * statistics.median(v) for k, v in times.items()},
              "ratios": {"bf16_adapter_over_bf16_base": ratio("bf16_adapter", "bf16_base"),
                         "fp32_adapter_over_fp32_base": ratio("fp32_adapter", "fp32_base"),
                         "bf16_base_over_fp32_base": ratio("bf16_base", "fp32_base"),
                         "bf16_adapter_over_fp32_adapter": ratio("bf16_adapter", "fp32_adapter")},
              "per_round_s_per_token": times}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("load_average_1min", "ms_per_token_median", "ratios")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
