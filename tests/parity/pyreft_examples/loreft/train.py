"""The paper's training script (pyreft's examples/loreft/train.py), a minimal copy with the same
flags and flow for the generation tasks: seed, tokenizer (pad = unk), LoReftSupervisedDataset,
LoReFT on block_output of the listed layers (listed twice for untied f+l), ReftTrainerForCausalLM,
args.json, --save_model into the run directory, generation eval per eval dataset.

Differences from the paper's file: no wandb; local JSON data (see dataset.py); ``v.eval()`` on
each intervention (the paper's ``v[0].eval()`` raises on pyvene >= 0.1.7, pyreft issue #177);
the per-step training losses are also written to ``losses.json`` for the parity test.
"""
import argparse
import datetime
import json
import os

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainerCallback,
                          TrainingArguments, set_seed)

from compute_metrics import compute_metrics
from dataset import LoReftSupervisedDataset
from pyreft import LoreftIntervention, ReftConfig, ReftDataCollator, ReftTrainerForCausalLM, TaskType, get_reft_model
from task_config import task_config

dtype_mapping = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def finetune(args):
    set_seed(args.seed)
    dtype = dtype_mapping[args.dtype]
    run_name = f"{args.model.rstrip('/').split('/')[-1]}.{args.task}.{datetime.datetime.now():%Y%m%d%H%M%S%f}"
    layers = [int(x) for x in args.layers.split(";")]
    if "+" in args.position and not args.share_weights:
        layers += layers

    tokenizer = AutoTokenizer.from_pretrained(args.model, model_max_length=args.max_length, padding_side="right",
                                              use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token

    config = task_config[args.task]
    train_name = config["train_datasets"][0] if args.train_dataset is None else args.train_dataset
    eval_names = config["eval_datasets"] if args.eval_dataset is None else [args.eval_dataset]
    kwargs = {"num_interventions": len(layers), "position": args.position, "share_weights": args.share_weights}
    train_dataset = LoReftSupervisedDataset(args.task, os.path.join(args.data_dir, train_name), tokenizer,
                                            data_split="train", seed=args.seed,
                                            max_n_example=args.max_n_train_example,
                                            **kwargs, test_split=args.test_split)
    eval_datasets = {}
    for name in eval_names:
        for split in args.test_split.split(";"):
            ds = LoReftSupervisedDataset(args.task, os.path.join(args.data_dir, name), tokenizer, data_split=split,
                                         seed=args.seed, max_n_example=args.max_n_eval_example, **kwargs)
            eval_datasets[(name, split)] = (ds, ds.raw_dataset)

    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    collator = ReftDataCollator(data_collator=DataCollatorForSeq2Seq(
        tokenizer=tokenizer, model=model, label_pad_token_id=-100, padding="longest"))
    representations = [{
        "layer": layer, "component": "block_output", "low_rank_dimension": args.rank,
        "intervention": LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=args.rank,
                                           dropout=args.dropout, dtype=dtype, act_fn=args.act_fn, device="cpu",
                                           add_bias=args.add_bias)} for layer in layers]
    task_type = TaskType.CAUSAL_LM  # noqa: F841 - the paper sets it and never reads it
    reft_model = get_reft_model(model, ReftConfig(representations=representations))
    reft_model.print_trainable_parameters()
    reft_model.model.train()
    n_params = reft_model.count_parameters(include_model=False)

    training_args = TrainingArguments(
        output_dir=f"{args.output_dir}/{run_name}", run_name=run_name, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, evaluation_strategy="no",
        save_strategy="no", logging_strategy="steps", save_total_limit=1, logging_steps=args.logging_steps,
        lr_scheduler_type=args.schedule, learning_rate=args.lr, warmup_ratio=args.warmup_ratio,
        optim="adamw_torch", weight_decay=args.weight_decay, report_to="none", use_cpu=True, seed=args.seed,
        remove_unused_columns=False)
    recorder = LossRecorder()
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args,
                                     train_dataset=train_dataset, data_collator=collator, callbacks=[recorder])
    trainer.train()

    run_dir = f"{args.output_dir}/{run_name}"
    with open(f"{run_dir}/args.json", "w") as f:
        json.dump({**vars(args), "n_params": n_params}, f, indent=4)
    with open(f"{run_dir}/losses.json", "w") as f:
        json.dump(recorder.losses, f)
    if args.save_model:
        reft_model.save(run_dir)

    reft_model.model.eval()
    for v in reft_model.interventions.values():
        v.eval()
    results = {}
    for (name, split), (ds, items) in eval_datasets.items():
        generations, stats = compute_metrics(args.task, name, reft_model, tokenizer, ds, items,
                                             train_dataset.trigger_tokens, args.eval_batch_size,
                                             config["generation_args"])
        results.update(stats)
        with open(f"{run_dir}/{name}_{split}_outputs.json", "w") as f:
            json.dump(generations, f, indent=4)
    with open(f"{run_dir}/eval_results.json", "w") as f:
        json.dump({**results, "n_params": n_params}, f, indent=4)
    print(f"Training results can be found in {run_dir}")


def main():
    p = argparse.ArgumentParser(description="LoReFT paper script (minimal copy)")
    p.add_argument("-task", "--task", type=str, default=None)
    p.add_argument("-data_dir", "--data_dir", type=str, default="./datasets")
    p.add_argument("-train_dataset", "--train_dataset", type=str, default=None)
    p.add_argument("-eval_dataset", "--eval_dataset", type=str, default=None)
    p.add_argument("-model", "--model", type=str)
    p.add_argument("-seed", "--seed", type=int, default=42)
    p.add_argument("-l", "--layers", type=str, default="2;10;18;26")
    p.add_argument("-r", "--rank", type=int, default=8)
    p.add_argument("-p", "--position", type=str, default="f1+l1")
    p.add_argument("-e", "--epochs", type=int, default=1)
    p.add_argument("-save_model", "--save_model", action="store_true")
    p.add_argument("-max_n_train_example", "--max_n_train_example", type=int, default=None)
    p.add_argument("-max_n_eval_example", "--max_n_eval_example", type=int, default=None)
    p.add_argument("-gradient_accumulation_steps", "--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("-batch_size", "--batch_size", type=int, default=4)
    p.add_argument("-eval_batch_size", "--eval_batch_size", type=int, default=4)
    p.add_argument("-output_dir", "--output_dir", type=str, default="./official_results")
    p.add_argument("-lr", "--lr", type=float, default=5e-3)
    p.add_argument("-schedule", "--schedule", type=str, default="linear")
    p.add_argument("-wu", "--warmup_ratio", type=float, default=0.00)
    p.add_argument("-wd", "--weight_decay", type=float, default=0.00)
    p.add_argument("-dropout", "--dropout", type=float, default=0.00)
    p.add_argument("-act_fn", "--act_fn", type=str, default=None)
    p.add_argument("-add_bias", "--add_bias", action="store_true")
    p.add_argument("-test_split", "--test_split", type=str, default="test")
    p.add_argument("-max_length", "--max_length", type=int, default=512)
    p.add_argument("-dtype", "--dtype", type=str, default="bfloat16")
    p.add_argument("-logging_steps", "--logging_steps", type=int, default=1)
    p.add_argument("-share_weights", "--share_weights", action="store_true")
    finetune(p.parse_args())


if __name__ == "__main__":
    main()
