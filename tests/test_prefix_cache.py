"""The frozen-prefix activation cache: the same losses as without it (<= 1e-6 relative, fp32,
3 epochs, reshuffled batches), for a Llama-layout model, Gemma (embedding scale), GPT-2 (learned
positions) and BERT (an encoder, classification), through ReftTrainer* and a plain
``transformers.Trainer`` with the callback, with gradient checkpointing; and every case where it
must stay off says why."""
import pytest
import torch
import transformers
from transformers import TrainingArguments

import reft_kernels as rk
from reft_kernels.jobs.prompts import format_prompt, load_builtin_instructions
from reft_kernels.base_models.tiny import build_word_tokenizer, tiny_llama
from reft_kernels.model.prefix_cache import PrefixCache, PrefixCacheCallback

pytestmark = pytest.mark.usefixtures("one_thread")
D, R, LAYERS = 32, 2, 4


@pytest.fixture(scope="module")
def corpus():
    rows = load_builtin_instructions()[:16]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    return prompts, [r["output"] for r in rows], build_word_tokenizer(prompts + [r["output"] for r in rows])


def causal_lm(family, vocab):
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(vocab, hidden_size=D, num_layers=LAYERS, num_heads=2)
    if family == "gemma":
        cfg = transformers.GemmaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0)
        return transformers.GemmaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=D, n_layer=LAYERS, n_head=2, n_positions=256,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def reft_on(model, layers=(2, 3), dropout=0.0):
    torch.manual_seed(1)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": R,
             "intervention": rk.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=torch.float32,
                                                   dropout=dropout)} for i in layers]
    return rk.get_reft_model(model, rk.ReftConfig(representations=reps), backend="torch")


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                weight_decay=0.0, remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def cache_of(trainer):
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PrefixCacheCallback)]
    return found[0].cache if found else None


def train_causal(corpus, family, tmp_path, cache, plain=False, **kw):
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    reft = reft_on(causal_lm(family, len(tok)))
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts, outputs, positions="f2+l2",
                                                            num_interventions=2)
    if plain:
        trainer = transformers.Trainer(model=reft, args=targs(tmp_path, **kw), **data,
                                       callbacks=[PrefixCacheCallback()] if cache else None)
    else:
        trainer = rk.ReftTrainerForCausalLM(model=reft, args=targs(tmp_path, **kw), prefix_cache=cache, **data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], cache_of(trainer)


def assert_same_losses(a, b):
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-6 * abs(y), (a, b)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_cached_training_has_the_same_losses(corpus, family, tmp_path):
    without, none = train_causal(corpus, family, tmp_path / "a", cache=False)
    with_cache, cache = train_causal(corpus, family, tmp_path / "b", cache=True)
    assert none is None and cache.reason is None
    assert (cache.misses, cache.hits) == (4, 8)   # epoch 1 fills it; epochs 2-3 start at layer 2
    assert_same_losses(with_cache, without)


def test_plain_hf_trainer_with_the_callback(corpus, tmp_path):
    without, _ = train_causal(corpus, "llama", tmp_path / "a", cache=False, plain=True)
    with_cache, cache = train_causal(corpus, "llama", tmp_path / "b", cache=True, plain=True)
    assert cache.hits == 8
    assert_same_losses(with_cache, without)


@pytest.mark.parametrize("reentrant", [False, True])
def test_with_gradient_checkpointing(corpus, tmp_path, reentrant):
    kw = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain, _ = train_causal(corpus, "llama", tmp_path / "a", cache=False)
    without, _ = train_causal(corpus, "llama", tmp_path / "b", cache=False, **kw)
    with_cache, cache = train_causal(corpus, "llama", tmp_path / "c", cache=True, **kw)
    assert cache.hits == 8
    assert_same_losses(with_cache, without)
    assert_same_losses(with_cache, plain)


def test_bert_classification(tmp_path):
    texts = ["good great fine", "bad awful poor", "great good", "poor bad", "fine good great", "awful bad",
             "good", "bad awful", "fine fine great good", "poor", "great", "awful poor bad"] * 2
    labels = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0] * 2
    tok = build_word_tokenizer(texts)
    losses, caches = [], []
    for cache in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=len(tok), hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        reft = reft_on(model)
        model.classifier.requires_grad_(True)   # a trainable head above the prefix does not stop the cache
        dm = rk.make_classification_data_module(tok, model, texts, labels, positions="f1+l1", num_interventions=2,
                                                share_weights=False)
        tr = rk.ReftTrainerForSequenceClassification(model=reft, args=targs(tmp_path / str(cache),
                                                     per_device_train_batch_size=6), prefix_cache=cache, **dm)
        tr.train()
        losses.append([h["loss"] for h in tr.state.log_history if "loss" in h])
        caches.append(cache_of(tr))
    assert caches[1].hits + caches[1].misses == 12 and caches[1].hits >= 8   # texts repeat: hits may come early
    assert_same_losses(losses[1], losses[0])


def encode(tok, texts):
    out = tok(texts, return_tensors="pt", padding=True)   # transformers 4.45 adds token_type_ids
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def _reason(reft):
    return PrefixCache(reft, log=lambda m: None).reason


def test_off_with_a_reason(corpus):
    prompts, outputs, tok = corpus
    assert "layer 0" in _reason(reft_on(tiny_llama(len(tok), hidden_size=D, num_layers=LAYERS, num_heads=2), (0, 2)))
    model = tiny_llama(len(tok), hidden_size=D, num_layers=LAYERS, num_heads=2)
    reft = reft_on(model)
    model.get_input_embeddings().weight.requires_grad_(True)
    assert "below layer 2 requires grad" in _reason(reft)


def test_active_dropout_turns_it_off(corpus, tmp_path):
    prompts, outputs, tok = corpus
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=D, n_layer=LAYERS,
                                                                 n_head=2, resid_pdrop=0.1))
    reft = reft_on(model)
    messages = []
    cache = PrefixCache(reft, log=messages.append)
    assert cache.install()
    model.train()
    batch = encode(tok, prompts[:2])
    model(**batch)
    assert cache.reason and "Dropout with p=0.1" in cache.reason and messages == [f"prefix cache off: {cache.reason}"]
    assert "forward" not in vars(model.transformer.h[0])   # the blocks are restored


def test_budget_stops_storing_and_stays_exact(corpus, tmp_path):
    prompts, outputs, tok = corpus
    reft = reft_on(tiny_llama(len(tok), hidden_size=D, num_layers=LAYERS, num_heads=2))
    messages = []
    cache = PrefixCache(reft, max_bytes=4096, log=messages.append)
    cache.install()
    reft.model.eval()
    tok.padding_side = "right"
    batch = encode(tok, prompts[:4])
    with torch.no_grad():
        ref = reft.model(**batch).logits
        again = reft.model(**batch).logits
    assert cache.full and cache.bytes <= 4096 and "prefix cache full" in messages[0]
    assert cache.hits == 0 and torch.equal(ref, again)


def test_a_hit_returns_the_uncached_logits_for_real_tokens(corpus):
    prompts, outputs, tok = corpus
    reft = reft_on(tiny_llama(len(tok), hidden_size=D, num_layers=LAYERS, num_heads=2))
    tok.padding_side = "right"
    batch = encode(tok, prompts[:4])
    with torch.no_grad():
        ref = reft.model(**batch).logits
        cache = PrefixCache(reft, log=lambda m: None)
        cache.install()
        reft.model(**batch)
        hit = reft.model(**encode(tok, prompts[2:4])).logits   # other padding
        cache.remove()
    assert cache.hits == 1
    mask = encode(tok, prompts[2:4])["attention_mask"].bool()
    torch.testing.assert_close(hit[mask], ref[2:4, :hit.shape[1]][mask], rtol=1e-6, atol=1e-6)


def test_callback_budget_is_checked():
    with pytest.raises(ValueError, match="max_gb=0"):
        PrefixCacheCallback(max_gb=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_while_the_cache_is_installed(corpus, family):
    """A generate() inside train() (sampling mid-training) runs every layer with its KV cache, whatever
    the installed transformers calls the cache (``cache=`` on 5.x, ``past_key_values=`` on 4.x):
    it neither stores its calls nor starts at a stored training row (the next decode step crashed)."""
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    reft = reft_on(causal_lm(family, len(tok)))
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts[:4], outputs[:4],
                                                            positions="f2+l2", num_interventions=2)
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "intervention_locations")}
    row = batch["input_ids"][:1, :int(batch["attention_mask"][0].sum())]
    kw = dict(intervention_locations=torch.tensor([[[0], [row.shape[1] - 1]]]), max_new_tokens=4, do_sample=False,
              attention_mask=torch.ones_like(row), pad_token_id=0, eos_token_id=None)
    reft.eval()
    expected = reft.generate(input_ids=row, **kw)
    cache = PrefixCache(reft, log=lambda m: None)
    assert cache.install()
    reft.train()
    reft(**batch).loss.backward()       # epoch 1 stores every row, the prompt's row among them
    stored = len(cache.rows)
    reft.eval()
    assert torch.equal(reft.generate(input_ids=row, **kw), expected)
    assert len(cache.rows) == stored == 4
    cache.remove()


def test_an_interrupted_train_undoes_the_cache_and_the_labelled_logits(corpus, tmp_path):
    """A train() that raises (Ctrl-C, out of memory) reaches no on_train_end: ReftTrainer undoes its
    callbacks itself, and a cache callback started again removes the hooks of the one before."""
    prompts, outputs, tok = corpus
    tok.padding_side = "right"
    reft = reft_on(causal_lm("llama", len(tok)))
    data = rk.make_multiple_position_supervised_data_module(tok, reft.model, prompts, outputs, positions="f2+l2",
                                                            num_interventions=2)
    trainer = rk.ReftTrainerForCausalLM(model=reft, args=targs(tmp_path), **data)

    class Interrupt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise KeyboardInterrupt

    trainer.add_callback(Interrupt())
    block = reft.model.model.layers[0]
    hooks = len(reft.model._forward_pre_hooks)   # the ReftModel's own (the edit patch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not getattr(reft, "labelled_logits", False)
    assert "forward" not in vars(block) and len(reft.model._forward_pre_hooks) == hooks   # none left behind
    callback = PrefixCacheCallback(log=lambda m: None)
    callback.on_train_begin(None, None, None, model=reft)
    first = callback.cache
    callback.on_train_begin(None, None, None, model=reft)   # begun again without an end
    assert not first._handles and len(reft.model._forward_pre_hooks) == hooks + 1
    callback.on_train_end(None, None, None)
    assert "forward" not in vars(block) and len(reft.model._forward_pre_hooks) == hooks
