"""GPU checks that tests/test_ops.py and tests/test_triton_backend.py do not already make on CUDA.

Every backend available on the device, each against the float64 oracle or the torch backend:
a large odd shape (d = 2053, hundreds of rows, pads and duplicates) in fp32/bf16/fp16, the dropout
mask bit for bit across backends, ``torch.compile(fullgraph=True)`` of the op (inductor on CUDA),
a CUDA-graph capture of a decode-step edit, and a tiny Llama train step and greedy generate.

Skipped without a GPU, except under ``REFT_GPU_CHECK_ON_CPU=1`` (the GPU check's dry run,
``benchmarks/gpu_check.sh --dry-run``), which runs them on CPU at tiny sizes so the file is known
to work before the first GPU run.
"""
import os

import pytest
import torch

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("REFT_GPU_CHECK_ON_CPU") == "1":
    DEVICE = torch.device("cpu")
else:  # skip before the imports below (they build the native backend, import triton, transformers)
    pytest.skip("needs a CUDA GPU (REFT_GPU_CHECK_ON_CPU=1 runs these on CPU, as "
                "benchmarks/gpu_check.sh --dry-run does)", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import reft_kernels  # noqa: E402
from reft_kernels.ops import reft_edit  # noqa: E402
from reft_kernels.ops.variants import canonical_rows, dropout_keep_mask  # noqa: E402
from test_ops import available_backends, check_against_oracle, make_params, make_positions  # noqa: E402

CUDA = DEVICE.type == "cuda"
BACKENDS = available_backends(DEVICE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]


@pytest.fixture(autouse=True)
def _small_cpu():
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_odd_shape_matches_oracle(backend, dtype):
    """d not a multiple of any tile, N in the hundreds, pads and duplicates, dropout, every gradient."""
    B, T, d, uniques = (6, 301, 2053, [97, 1, 64, 130, 33, 89]) if CUDA else (3, 13, 37, [5, 1, 6])
    wdtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    check_against_oracle("loreft", backend, dtype, wdtype, r=8, d=d, B=B, T=T, uniques=uniques,
                         act="silu", dropout=0.1, device=DEVICE)


@pytest.mark.parametrize("variant", ["loreft", "lobireft"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_identical_across_backends(variant, dtype):
    """The dropped elements are the same bits for every backend and equal the Philox mask."""
    gen = torch.Generator().manual_seed(4)
    B, T, d = (4, 33, 515) if CUDA else (2, 9, 40)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE, dtype)
    positions = make_positions(B, T, [T // 2] * B, gen=gen).to(DEVICE)
    params = [None if p is None else p.to(DEVICE) for p in make_params(variant, 4, d, torch.float32, gen)]
    rows = canonical_rows(positions, T)
    live = rows[rows >= 0]
    expected = ~dropout_keep_mask(9, rows.cpu(), d, 0.5)[(rows >= 0).cpu()]
    for backend in BACKENDS:
        out = reft_edit(hidden, positions, *params, variant=variant, dropout=0.5, seed=9, backend=backend)
        dropped = (out.view(-1, d)[live] == 0).cpu()
        assert torch.equal(dropped, expected), f"{backend}: dropout mask differs from the Philox mask"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) of a step around the op: no graph break, same loss and grads."""
    gen = torch.Generator().manual_seed(2)
    B, T, d = (3, 40, 257) if CUDA else (2, 6, 32)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE)
    positions = make_positions(B, T, [5, 3, 7][:B], gen=gen).to(DEVICE)
    params = [p.to(DEVICE) for p in make_params("loreft", 4, d, torch.float32, gen)[:3]]

    def step(h, R, W, b):
        out = reft_edit(h * 1.0, positions, R, W, b, act="gelu", dropout=0.1, seed=4,
                        inplace=True, backend=backend)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    results = []
    for fn in (compiled, step):
        h = hidden.clone().requires_grad_(True)
        ps = [p.clone().requires_grad_(True) for p in params]
        loss = fn(h, *ps)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, [h] + ps)))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_decode_step_matches_eager(backend):
    """The decode-step edit (B=64, T=1, P=1) captured in a CUDA graph and replayed on new data."""
    gen = torch.Generator().manual_seed(3)
    B, d = 64, 4096
    params = [p.to(DEVICE, torch.bfloat16) for p in make_params("loreft", 4, d, torch.float32, gen)[:3]]
    static_h = torch.randn(B, 1, d, generator=gen).to(DEVICE, torch.bfloat16)
    positions = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
    positions[::5] = -1                                          # some rows not edited
    with torch.no_grad():
        side = torch.cuda.Stream()                                # warm-up (builds, compiles) on a
        side.wait_stream(torch.cuda.current_stream())            # side stream, as torch.cuda.graph asks
        with torch.cuda.stream(side):
            for _ in range(2):
                reft_edit(static_h.clone(), positions, *params, backend=backend)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        old = reft_edit(static_h, positions, *params, backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = reft_edit(static_h, positions, *params, backend=backend)
        new = torch.randn(B, 1, d, generator=gen).to(DEVICE, torch.bfloat16)
        static_h.copy_(new)
        graph.replay()
        expected = reft_edit(new, positions, *params, backend=backend)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, expected)            # bf16 tolerances
    assert not torch.allclose(static_out, old), "the replay must read the new input"


# ------------------------------------------------------------------------------------------
H = 192 if CUDA else 64


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=H // 32,
                      num_key_value_heads=H // 64, vocab_size=211, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def reft_llama(base, backend, dtype):
    """The base model copy in ``dtype`` on DEVICE, LoReFT at both layers (strong bias: edits matter)."""
    model = LlamaForCausalLM(base.config).to(DEVICE, dtype)
    model.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    reps = []
    for layer in (0, 1):
        iv = reft_kernels.LoreftIntervention(embed_dim=H, low_rank_dimension=4, dtype=dtype)
        with torch.no_grad():
            iv.learned_source.bias.fill_(3.0)
        reps.append({"layer": layer, "component": "block_output", "low_rank_dimension": 4, "intervention": iv})
    return reft_kernels.get_reft_model(model, reft_kernels.ReftConfig(representations=reps), backend=backend)


def batch(B=3, T=11):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 211, (B, T), generator=g)
    # (B, n_interventions, P): last / first positions, a duplicate and a -1 pad per row
    locs = torch.tensor([[[T - 1, T - 2, T - 2, -1], [0, 1, -1, 1]]] * B)
    return ids.to(DEVICE), locs.to(DEVICE)


def train_step(reft, ids, locs):
    reft.train()
    out = reft(input_ids=ids, attention_mask=torch.ones_like(ids), intervention_locations=locs, labels=ids)
    out.loss.backward()
    grads = [p.grad.detach().float().clone() for p in reft.parameters() if p.requires_grad]
    return out.loss.detach().float(), grads


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if CUDA else [torch.float32])
def test_llama_train_step_matches_torch_backend(llama, backend, dtype):
    ids, locs = batch()
    ref_loss, ref_grads = train_step(reft_llama(llama, "torch", dtype), ids, locs)
    reft = reft_llama(llama, backend, dtype)
    loss, grads = train_step(reft, ids, locs)
    # bf16: the two backends round differently and the difference goes through a bf16 backward
    tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert len(grads) == len(ref_grads) == 6                       # R, W, b of two interventions
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        scale = max(1.0, rg.abs().max().item())
        torch.testing.assert_close(g / scale, rg / scale, **tol)
    opt = torch.optim.AdamW([p for p in reft.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    loss2, _ = train_step(reft, ids, locs)
    assert torch.isfinite(loss2) and loss2 != loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_generate_matches_torch_backend(llama, backend):
    """Greedy tokens (fp32) equal the torch backend's, and differ from the unedited model's."""
    ids, locs = batch(B=2, T=9)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    outs = {}
    for name in dict.fromkeys(["torch", backend]):
        reft = reft_llama(llama, name, torch.float32)
        outs[name] = reft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   intervention_locations=locs, **kw)
    plain = reft.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(outs[backend], outs["torch"])
    assert not torch.equal(outs[backend], plain), "the edit should change the greedy tokens"
