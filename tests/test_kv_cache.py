"""The KV-cache keyword across transformers versions (reft_kernels.compat.kv_cache), and no call of
ours passing the deprecated ``past_key_values=`` (transformers 5.x warns "``past_key_values`` is
deprecated and will be removed in version 5.40.0 ... Use ``cache`` instead"; after the removal the
keyword would fall into the models' ``**kwargs``, and a continued call would run without its
prefix)."""
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from reft_kernels.compat.kv_cache import cache_keyword, cache_kwargs, output_cache
from tiny_llama_reft import two_layer_reft

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_call_continued_from_its_cache_equals_the_full_call(family):
    """Prefix call, then the suffix continued from the prefix's cache (under the keyword the model
    takes): the suffix logits of one full call. A wrong keyword fails here: transformers 4.x raises
    on ``cache=``, 5.x runs the suffix without its prefix."""
    if family == "llama":
        model, _, reft, prompts = two_layer_reft(lambda b: b.fill_(1.0))
        ids = prompts[1][None]
        assert cache_keyword(reft) == cache_keyword(model)   # a ReftModel is asked for its base model
    else:
        model, ids = tiny_gpt2(), torch.randint(1, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = output_cache(model(input_ids=ids[:, :5], use_cache=True))
        assert cache is not None
        suffix = model(input_ids=ids[:, 5:], use_cache=True, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(suffix, full[:, 5:], rtol=1e-5, atol=1e-5)


def _cache_deprecations(record) -> list:
    return [str(w.message) for w in record
            if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]


def test_our_calls_pass_no_deprecated_cache_keyword():
    """Generation (cached, uncached, decode-time edits, beam search), a training forward and a call
    continued from a cache through the ReftModel: no ``past_key_values`` deprecation warning.
    Skipped where the installed transformers does not deprecate the keyword."""
    model, _, reft, prompts = two_layer_reft(lambda b: b.fill_(1.0))
    ids = prompts[1][None]
    with torch.no_grad(), warnings.catch_warnings(record=True) as probe:
        warnings.simplefilter("always")
        cache = output_cache(model(input_ids=ids[:, :5], use_cache=True))
        model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True)
    if not _cache_deprecations(probe):
        pytest.skip("this transformers takes past_key_values without a deprecation warning")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for extra in ({}, {"use_cache": False}, {"generated_positions": "all"}, {"num_beams": 2}):
            reft.generate(input_ids=ids, **kw, **extra)
        reft.train()
        reft(input_ids=ids, labels=ids).loss.backward()
        reft.eval()
        with torch.no_grad():
            cache = output_cache(reft(input_ids=ids[:, :5], use_cache=True))
            reft(input_ids=ids[:, 5:], use_cache=True, **cache_kwargs(reft, cache))
    assert not _cache_deprecations(record), _cache_deprecations(record)
