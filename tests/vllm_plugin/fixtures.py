"""Shared pieces of the vLLM plugin tests: a tiny random Llama saved for vLLM, random adapters in
our format and pyreft's, the HF reference (``ReftModel.generate``, one prompt at a time) and a
runner that executes vLLM in a subprocess (one engine per configuration, nothing shared).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the a cat dog sat on mat and ran to house big small red blue green one two three four five "
         "six seven eight nine ten is was he she it they we you i saw under over near far fast slow").split()
# adapter name -> (positions, share_weights, layers of its interventions, variant, rank, format)
ADAPTERS = {
    "last1": ("l1", False, [0], "LoreftIntervention", 4, "ours"),
    "first1": ("f1", False, [0], "NoreftIntervention", 2, "ours"),
    "fl3": ("f3+l3", False, [0, 0], "LoreftIntervention", 4, "ours"),     # untied: first/last at layer 0
    "pyr": ("l1", False, [0, 1], "LoreftIntervention", 3, "pyreft"),     # pyreft's format
}


def build_tiny(root: str) -> str:
    """A 2-layer random Llama (head_dim 64, vLLM's CPU attention needs it) with a word tokenizer."""
    from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama
    path = os.path.join(root, "tiny-llama")
    if os.path.isdir(path):
        return path
    tok = build_word_tokenizer([" ".join(WORDS)])
    model = tiny_llama(len(tok), hidden_size=128, num_layers=2, num_heads=2, seed=0, initializer_range=0.3)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_adapters(model_dir: str, root: str, specs=ADAPTERS) -> dict:
    """Random adapters per ``specs`` saved under ``root``; {name: {"path", "positions"}}."""
    from transformers import AutoModelForCausalLM
    from reft_kernels import ReftConfig, get_reft_model
    from reft_kernels.checkpoint.api import export_pyreft
    out = {}
    for i, (name, (positions, share, layers, cls, rank, fmt)) in enumerate(specs.items()):
        path = os.path.join(root, f"adapter-{name}")
        out[name] = {"path": path, "positions": positions}
        if os.path.isdir(path):
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(100 + i)
        reps = [{"layer": l, "component": "block_output", "low_rank_dimension": rank,
                 "intervention_type": cls, "intervention_kwargs": {"dtype": torch.float32}} for l in layers]
        reft = get_reft_model(model, ReftConfig(representations=reps))
        with torch.no_grad():   # random, large enough that every edit changes the greedy answer
            for iv in reft.interventions.values():
                for p in iv.learned_source.parameters():
                    p.normal_(0, 2.0)
                if hasattr(iv, "proj_layer"):
                    iv.proj_layer.weight.normal_(0, 1.0)
        if fmt == "pyreft":
            export_pyreft(reft, path, include_model=False)
        else:
            reft.save(path, include_model=False)
        with open(os.path.join(path, "reft_run.json"), "w") as f:   # what `reft-kernels train` records
            json.dump({"positions": positions, "share_weights": share}, f)
    return out


def prompts_for(tokenizer, n: int = 8):
    """``n`` token prompts of different lengths (3..25 tokens)."""
    g = torch.Generator().manual_seed(7)
    vocab = [tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    lengths = [3, 25, 7, 12, 4, 18, 9, 15, 5, 21][:n]
    return [[vocab[int(j)] for j in torch.randint(len(vocab), (L,), generator=g)] for L in lengths]


def hf_reference(model_dir: str, adapters: dict, requests, max_tokens: int) -> list:
    """Greedy tokens of ``ReftModel.generate`` per (prompt ids, adapter name | None[, generated_positions]),
    one at a time."""
    from transformers import AutoModelForCausalLM
    from reft_kernels import ReftConfig, ReftModel
    from reft_kernels.data.positions import prompt_locations
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    holder = ReftModel(ReftConfig(representations=[]), model, backend="torch")
    holder.delete_adapter(holder.adapter_names[0])
    for name, item in adapters.items():
        holder.load_adapter(item["path"], adapter_name=name)
    outs = []
    with torch.inference_mode():
        for ids, name, *gen in requests:          # (prompt ids, adapter) or (..., generated_positions)
            x = torch.tensor([ids])
            kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                      min_new_tokens=max_tokens, pad_token_id=0)
            if name is None:
                out = model.generate(**kw)
            else:
                n = len(holder.adapter_config(name).representations)
                locs = torch.tensor([prompt_locations(len(ids), adapters[name]["positions"], n, False)])
                out = holder.generate(intervention_locations=locs, adapter_ids=[name],
                                      generated_positions=gen[0] if gen else None, **kw)
            outs.append(out[0, len(ids):].tolist())
    return outs


def run_vllm(spec: dict, timeout: int = 400) -> dict:
    """Run ``vllm_runner.py`` on ``spec`` in a fresh process; its JSON answer."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               REFT_KERNELS_BACKEND=os.environ.get("REFT_KERNELS_BACKEND", "torch"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "vllm_runner.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM runner failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise AssertionError(f"vLLM runner printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])
