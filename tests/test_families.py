"""Every supported model family, on tiny random configs, at whichever transformers version runs it
(CI runs this file at both ends of the supported range, 4.45.1 and the latest):

* the intervention edits exactly the selected rows of the chosen block, against Phi computed by hand
  in float64 from the block's un-edited output (all other rows bit-for-bit untouched);
* every abstract component of the family lands on a (batch, seq, hidden) tensor and equals a plain
  reference hook placed there;
* decoders: greedy and beam-search ``generate`` give the same tokens with and without the KV cache
  (left-padded batch, edits at the first real and the last prompt token; and at position 0);
* save / load round-trips to identical outputs.
"""
import pytest
import torch
import transformers

import reft_kernels as pyreft
from reft_kernels.families import FAMILIES, resolve_site
from test_patcher import add_reference_hook

H, RANK, VOCAB, LAYER = 32, 4, 96, 1
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
SPECIAL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER_LAYOUT = dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)

# family -> (config class, config kwargs, decoder?)
CASES = {
    "llama": ("LlamaConfig", DECODER_LAYOUT, True),
    "mistral": ("MistralConfig", DECODER_LAYOUT, True),
    "qwen2": ("Qwen2Config", DECODER_LAYOUT, True),
    "qwen3": ("Qwen3Config", dict(DECODER_LAYOUT, head_dim=8), True),
    "gemma": ("GemmaConfig", dict(DECODER_LAYOUT, head_dim=8, hidden_act="gelu_pytorch_tanh",
                                  hidden_activation="gelu_pytorch_tanh"), True),
    # Gemma2 generates with a hybrid cache (4.x: a HybridCache, whose get_seq_length() is not the
    # number of tokens seen). From 5.0 a sliding window of 8 < prompt + generated tokens makes its
    # sliding layers really slide. Under 4.x the default window (4096) is kept: with window 8 the
    # 4.45.1 base model alone, no intervention, already scores differently with and without cache
    # once a sequence outgrows the window (logits off by ~0.1, other tokens for the left-padded
    # batch): a transformers quirk, independent of reft_kernels.
    "gemma2": ("Gemma2Config", dict(DECODER_LAYOUT, head_dim=8, hidden_activation="gelu_pytorch_tanh",
                                    **({"sliding_window": 8} if TRANSFORMERS_MAJOR >= 5 else {})), True),
    "phi3": ("Phi3Config", DECODER_LAYOUT, True),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64), True),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64), True),
    "opt": ("OPTConfig", dict(hidden_size=H, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=H, max_position_embeddings=64), True),
    "falcon": ("FalconConfig", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4), True),
    "bert": ("BertConfig", dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64), False),
    "distilbert": ("DistilBertConfig", dict(dim=H, hidden_dim=64, n_layers=2, n_heads=4,
                                            max_position_embeddings=64), False),
    "roberta": ("RobertaConfig", dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64), False),
}
DECODERS = [name for name, case in CASES.items() if case[2]]
NEW = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(family, seed=0):
    """The tiny fp32 model of ``family`` with fixed weights (skips where this transformers lacks it)."""
    config_name, kwargs, decoder = CASES[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name} ({family})")
    config = getattr(transformers, config_name)(**SPECIAL, **kwargs)
    if family == "gemma2":
        config._attn_implementation = "eager"   # what transformers recommends for Gemma2 (soft-capping)
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModelForMaskedLM
    torch.manual_seed(seed)
    return auto.from_config(config).float().eval()


def strong_loreft(seed=1):
    torch.manual_seed(seed)
    iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.float32)
    with torch.no_grad():
        iv.learned_source.bias.fill_(3.0)                   # a strong edit, so it changes the tokens
    return iv


def reft_on(model, component="block_output", layer=LAYER, iv=None):
    config = pyreft.ReftConfig(representations={"layer": layer, "component": component,
                                                "low_rank_dimension": RANK, "intervention": iv or strong_loreft()})
    return pyreft.get_reft_model(model, config, backend="torch")


def left_padded(lengths=(4, 7), seed=2):
    """Left-padded prompts: ids, mask, and per row [first real token, last token]."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = []
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, width - n:] = 1
        positions.append([width - n, width - 1])
    return ids, mask, positions


def phi_by_hand(iv, h):
    """LoReFT in float64, written out: Phi(h) = h + R^T (W h + b - R h), rows of ``h``."""
    R = iv.rotate_layer.weight.detach().double()
    R = R if R.shape == (RANK, H) else R.T                   # (r, d), orthonormal rows (pyreft keeps (d, r))
    W, b = iv.learned_source.weight.detach().double(), iv.learned_source.bias.detach().double()
    assert R.shape == (RANK, H) and torch.allclose(R @ R.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5)
    h = h.double()
    return h + (h @ W.T + b - h @ R.T) @ R


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def capture(module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(_first(o).detach().clone()))
    return seen, handle


@pytest.mark.parametrize("family", list(CASES))
def test_edits_exactly_the_selected_rows(family):
    model = make_model(family)
    ids, mask, positions = left_padded()
    inputs = {"input_ids": ids, "attention_mask": mask}
    block = resolve_site(model, LAYER, "block_output").module
    base_seen, handle = capture(block)                     # the un-edited block output
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    iv = strong_loreft()
    reft = reft_on(model, iv=iv)
    edited_seen, handle = capture(block)                   # registered after ours: sees the edit
    with torch.no_grad():
        reft(inputs, unit_locations={"sources->base": (None, [positions])})
    handle.remove()
    base, edited = base_seen[0], edited_seen[0]
    assert base.shape == edited.shape == (2, ids.shape[1], H)
    selected = torch.zeros(base.shape[:2], dtype=torch.bool)
    for b, row in enumerate(positions):
        selected[b, row] = True
    expected = phi_by_hand(iv, base[selected])
    torch.testing.assert_close(edited[selected].double(), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base[selected].double()).abs().max() > 0.5             # the edit is not a no-op
    assert torch.equal(edited[~selected], base[~selected])                    # other rows bit-for-bit


@pytest.mark.parametrize("family", list(CASES))
def test_every_component_equals_a_reference_hook(family):
    model = make_model(family)
    ids, mask, positions = left_padded()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        base = model(**inputs).logits
    for component in FAMILIES[family].components:
        iv = strong_loreft()
        reft = reft_on(model, component, iv=iv)
        with torch.no_grad():
            _, out = reft(inputs, unit_locations={"sources->base": (None, [positions])})
        reft.unload()
        site = resolve_site(model, LAYER, component)
        handle = add_reference_hook(site.module, site.kind, iv, torch.tensor(positions))
        with torch.no_grad():
            expected = model(**inputs).logits
        handle.remove()
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{component}: {m}")
        assert not torch.allclose(out.logits, base), component


def gen_kwargs(**kw):
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def generate_both(generate, prompt, **kw):
    """[cached, uncached] generations. Without a cache, cache_implementation (Gemma2's "hybrid") has
    no effect; it is cleared because 4.45.1's warning about it crashes inside logging."""
    return [generate(**prompt, **gen_kwargs(use_cache=True, **kw)),
            generate(**prompt, **gen_kwargs(use_cache=False, cache_implementation=None, **kw))]


GENERATION_CASES = {
    # batch of 2 left-padded prompts; the short row's first real token is 3, the long row's is 0
    "left_padded": lambda: left_padded(),
    # one prompt, edits at position 0 (window-local 0 is every decode step's token) and the last token
    "position_0": lambda: (torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4)),
                           torch.ones(1, 6, dtype=torch.long), [[0, 5]]),
}


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams3"])
@pytest.mark.parametrize("case", list(GENERATION_CASES))
@pytest.mark.parametrize("family", DECODERS)
def test_cached_generation_equals_uncached(family, case, beams):
    model = make_model(family)
    ids, mask, positions = GENERATION_CASES[case]()
    prompt = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        plain = generate_both(model.generate, prompt, num_beams=beams)
    assert torch.equal(plain[0], plain[1]), f"the base {family} model itself is not cache-consistent here"
    reft = reft_on(model, layer=0)      # the first block: an edit anywhere reaches later tokens' logits
    units = {"sources->base": (None, [positions])}

    def edited(input_ids, attention_mask, **kw):
        return reft.generate({"input_ids": input_ids, "attention_mask": attention_mask}, unit_locations=units,
                             **kw)[1]

    with torch.no_grad():
        cached, uncached = generate_both(edited, prompt, num_beams=beams)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain[0]), "the edit should change the generated tokens"


@pytest.mark.parametrize("family", list(CASES))
def test_save_load_round_trip(family, tmp_path):
    model = make_model(family)
    ids, mask, positions = left_padded()
    inputs = {"input_ids": ids, "attention_mask": mask}
    units = {"sources->base": (None, [positions])}
    reft = reft_on(model)
    reft.eval()
    with torch.no_grad():
        _, before = reft(inputs, unit_locations=units)
    reft.save(str(tmp_path / "adapter"))
    loaded = pyreft.ReftModel.load(str(tmp_path / "adapter"), make_model(family), backend="torch")
    with torch.no_grad():
        _, after = loaded(inputs, unit_locations=units)
    assert torch.equal(before.logits, after.logits)


# -- errors ---------------------------------------------------------------------------------------
def test_component_a_family_lacks_says_how_to_pass_a_string():
    model = make_model("opt")
    with pytest.raises(ValueError, match=r"mlp_output.*OPTForCausalLM.*flattened.*'model\.decoder\.layers\[1\]\.output'"):
        reft_on(model, "mlp_output")
    reft = reft_on(model, "model.decoder.layers[1].self_attn.output")      # the string form works
    assert len(reft.interventions) == 1


class _NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, H)
        self.out = torch.nn.Linear(H, VOCAB)

    def forward(self, input_ids):
        return self.out(self.embed(input_ids))


def test_unknown_model_without_blocks_names_the_class_and_the_string_form():
    with pytest.raises(ValueError, match=r"_NoBlocks.*string component.*'transformer\.h\[\d\]\.output'"):
        reft_on(_NoBlocks())
    reft = reft_on(_NoBlocks(), "embed.output")
    assert len(reft.interventions) == 1


def test_unknown_model_type_falls_back_to_its_block_list():
    """A model_type missing from the table: the generic search finds the blocks and sublayers."""
    model = make_model("llama")
    model.config.model_type = "my_llama_fork"
    for component, path in [("block_output", "model.layers[1]"), ("mlp_input", "model.layers[1].mlp"),
                            ("attention_output", "model.layers[1].self_attn")]:
        site = resolve_site(model, LAYER, component)
        assert site.path == path and site.module is model.get_submodule(path.replace("[", ".").replace("]", ""))
    gpt2 = make_model("gpt2")
    gpt2.config.model_type = "my_gpt2_fork"
    assert resolve_site(gpt2, 0, "attention_input").path == "transformer.h[0].attn"
    roberta = make_model("roberta")                                    # a BERT-layout block reads as BERT
    roberta.config.model_type = "my_roberta_fork"
    for component, (suffix, kind) in FAMILIES["roberta"].components.items():
        site = resolve_site(roberta, 0, component)
        assert (site.path, site.kind) == (f"roberta.encoder.layer[0]{suffix}", kind)


@pytest.mark.parametrize("layer", ["1", 1.0, None, True])
def test_layer_must_be_an_int(layer):
    with pytest.raises(TypeError, match=rf"layer={layer!r}.*must be an int"):
        reft_on(make_model("llama"), layer=layer)
