"""Instruction tuning with a chat template (pyreft's README flow, on reft_kernels).

Default: a tiny local Llama pretrained for a few seconds on the shipped instruction texts, with a
small chat template given to its word-level tokenizer (no hub access). With ``--model PATH`` any
causal LM with a chat template works (local directory or hub name), e.g.

    python python/instruction_tuning.py
    python python/instruction_tuning.py --model meta-llama/Llama-3.2-1B-Instruct --layers 8,16 --rank 4 --bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

import reft_kernels as pyreft  # noqa: E402
from reft_kernels.base_models.pretrained import load_pretrained  # noqa: E402
from reft_kernels.jobs.prompts import load_builtin_instructions  # noqa: E402
from reft_kernels.base_models.tiny import build_word_tokenizer, pretrain_base, tiny_llama  # noqa: E402

TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def tiny_model():
    rows = load_builtin_instructions()
    plain = [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows]
    tok = build_word_tokenizer(plain + ["user assistant :"])
    tok.chat_template = TINY_CHAT_TEMPLATE
    model = tiny_llama(len(tok), hidden_size=64, num_layers=2)
    pretrain_base(model, tok, plain, steps=100)
    return model, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="causal LM with a chat template (default: a tiny local Llama)")
    p.add_argument("--layers", default="all", help="comma-separated layers or 'all'")
    p.add_argument("--positions", default="f5+l5")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "reft_instruction_tuning"))
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = load_pretrained(transformers.AutoModelForCausalLM, args.model, torch.float32).eval()
        tok.pad_token = tok.pad_token or tok.eos_token
        if not tok.chat_template:
            p.error(f"{args.model} has no chat template; use an instruct/chat model")
    else:
        model, tok = tiny_model()

    rows = load_builtin_instructions()
    chats = [[{"role": "user", "content": r["instruction"] + (" " + r["input"] if r["input"] else "")}] for r in rows]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    outputs = [r["output"] for r in rows]

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    first_n, last_n = pyreft.parse_positions(args.positions)
    untied = first_n > 0 and last_n > 0
    d = model.config.hidden_size
    reft_config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": args.rank,
         "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=args.rank, dtype=torch.float32)}
        for layer in (layers + layers if untied else layers)])
    reft_model = pyreft.get_reft_model(model, reft_config, backend=args.backend)
    reft_model.print_trainable_parameters()

    tok.padding_side = "right"
    data = pyreft.make_multiple_position_supervised_data_module(
        tok, model, prompts, outputs, positions=args.positions, num_interventions=len(reft_config.representations),
        share_weights=not untied)
    training_args = transformers.TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, per_device_train_batch_size=8, learning_rate=args.lr,
        logging_steps=20, report_to=[], save_strategy="no", bf16=args.bf16, use_cpu=not torch.cuda.is_available())
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=training_args, **data)
    trainer.train()

    questions = ["What is the capital of Japan?", "What color is snow?", "Translate the word to Spanish. water"]
    batch = pyreft.make_generation_inputs(
        tok, [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
              for q in questions],
        positions=args.positions, num_interventions=len(reft_config.representations), share_weights=not untied,
        device=next(model.parameters()).device)
    reft_model.eval()
    with torch.no_grad():
        out = reft_model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
    for q, row in zip(questions, out[:, batch["input_ids"].shape[1]:]):
        print(f"Q: {q}\nA: {tok.decode(row, skip_special_tokens=True)}")
    reft_model.save(os.path.join(args.output, "adapter"))
    print(f"adapter saved to {os.path.join(args.output, 'adapter')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
