"""Tiny base models built in seconds, with no hub access (tests, CI, the tiny demo, the examples).

* :func:`build_word_tokenizer` -- a word-level ``PreTrainedTokenizerFast`` trained on given texts;
* :func:`tiny_llama` -- a small ``LlamaForCausalLM`` built from a config (random weights);
* :func:`pretrain_base` -- a few seconds of plain language-model training, a stand-in for a
  pretrained base model: it learns the texts but not an instruction -> response mapping.

A real pretrained model is in :mod:`reft_kernels.base_models.real`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer", "tiny_llama", "pretrain_base"]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


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
