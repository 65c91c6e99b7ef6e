"""Half precision end to end: bf16 and fp16 base models with fp32 or half interventions, on every
backend: a training step (checked against the float64 oracle's gradients), generation, and a
save/load round trip; dtype mixes that cannot work are refused with a clear error."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_kernels as pyreft
from reft_kernels.ops import resolve_backend
from reft_kernels.ops.reference import reft_edit_reference

H, RANK = 64, 4
BACKENDS = ["torch", "native", "triton"]
DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float16, torch.float16)]
pytestmark = pytest.mark.usefixtures("one_thread")


def available(backend, model_dtype):
    try:
        resolve_backend(backend, torch.device("cpu"))
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"backend {backend} unavailable here: {exc}")
    if backend == "triton" and model_dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton CPU interpreter has no bf16 (runs on GPUs; see benchmarks/gpu_check.sh)")


def half_model(model_dtype, iv_dtype, backend, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         pad_token_id=0)).to(model_dtype).eval()
    iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=iv_dtype)
    with torch.no_grad():
        iv.learned_source.bias.uniform_(-2, 2)
    config = pyreft.ReftConfig(representations={"layer": 1, "component": "block_output",
                                                "low_rank_dimension": RANK, "intervention": iv})
    return model, iv, pyreft.get_reft_model(model, config, backend=backend)


def layer_output(model, layer, call):
    """The (first) output tensor of ``model.model.layers[layer]`` during ``call()``, kept for grads.

    Registered after ReftModel's hooks, so it sees the edited tensor of an armed call."""
    seen = {}

    def hook(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output
        if seen["h"].requires_grad:
            seen["h"].retain_grad()
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        return call(), seen["h"]
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_dtype,iv_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_train_step_matches_the_float64_oracle(backend, model_dtype, iv_dtype):
    """One training step through a half model: the edited layer output and the intervention's
    gradients equal the float64 oracle's for the same (half) hidden states and upstream gradient."""
    available(backend, model_dtype)
    model, iv, reft = half_model(model_dtype, iv_dtype, backend)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    locs = torch.tensor([[[0, 6]], [[3, -1]]])                     # (B, n_interventions, P)
    with torch.no_grad():
        _, plain = layer_output(model, 1, lambda: model(input_ids=ids))    # unarmed: the unedited states
    reft.train()
    out, edited = layer_output(model, 1, lambda: reft(input_ids=ids, intervention_locations=locs))
    out.logits.float().square().mean().backward()
    grads = {n: p.grad for n, p in iv.named_parameters()}
    assert all(g is not None and g.dtype == p.dtype and torch.isfinite(g).all()
               for g, p in zip(grads.values(), iv.parameters()))

    R = iv.rotate_layer.weight.detach().double().requires_grad_()
    W, b = (t.detach().double().requires_grad_() for t in (iv.learned_source.weight, iv.learned_source.bias))
    ref = reft_edit_reference(plain.double(), locs[:, 0], R, W, b, None, variant="loreft", act=None)
    ref.backward(edited.grad.double())
    eps = torch.finfo(model_dtype).eps
    torch.testing.assert_close(edited.detach().double(), ref.detach(), rtol=2 * eps, atol=4 * eps * ref.abs().max().item())
    for got, want in ((grads["learned_source.weight"], W.grad), (grads["learned_source.bias"], b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=4 * eps, atol=8 * eps * want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_dtype,iv_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_generate_and_save_load_round_trip(backend, model_dtype, iv_dtype, tmp_path):
    available(backend, model_dtype)
    model, iv, reft = half_model(model_dtype, iv_dtype, backend)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    units = {"sources->base": (None, [[[0, 5], [5]]])}
    first = reft.generate({"input_ids": ids}, unit_locations=units, **kw)[1]
    uncached = reft.generate({"input_ids": ids}, unit_locations=units, use_cache=False, **kw)[1]
    assert first.shape == (2, 11)
    if torch.equal(model.generate(input_ids=ids, **kw), model.generate(input_ids=ids, use_cache=False, **kw)):
        assert torch.equal(first, uncached)          # half-precision base cache-consistent -> so are we
    reft.save(tmp_path / "ck")
    loaded = pyreft.ReftModel.load(tmp_path / "ck", model, backend=backend)
    loaded_iv = next(iter(loaded.interventions.values()))
    assert loaded_iv.learned_source.weight.dtype == iv_dtype
    for a, b in zip(iv.state_dict().values(), loaded_iv.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(loaded.generate({"input_ids": ids}, unit_locations=units, **kw)[1], first)


def test_dtype_mixes_that_cannot_work_are_refused():
    with pytest.raises(TypeError, match="dtype"):
        pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype="float8")
    iv = pyreft.LoreftIntervention(embed_dim=H, low_rank_dimension=RANK, dtype=torch.float32)
    with pytest.raises((TypeError, ValueError), match="hidden"):
        iv(torch.randint(0, 5, (1, 3, H)), positions=torch.tensor([[0]]), backend="torch")
