"""Numerics of the ReFT op family against a float64 reference, for every backend.

Rule (flash-attention style): a backend's error against the float64 oracle is at most twice the
error plain PyTorch (the reference run at the same precision) makes, plus a small atol.
"""
import pytest
import torch

from reft_kernels.ops import VARIANTS, reft_edit
from reft_kernels.ops.autograd import get_backend
from reft_kernels.ops.variants import canonical_rows, dropout_keep_mask
from reft_kernels.ops.reference import reft_edit_reference

DTYPE_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def available_backends(device=torch.device("cpu")):
    names = ["torch"]
    for name in ("triton", "native"):
        try:
            mod = get_backend(name)
        except Exception:  # noqa: BLE001 - backend not importable here
            continue
        if mod.is_available(device):
            names.append(name)
    return names


BACKENDS = available_backends()
CUDA_BACKENDS = available_backends(CUDA) if CUDA is not None else []


def make_positions(B, T, uniques, extra_dups=1, pads=2, gen=None):
    """(B, P) positions: per row `uniques[b]` distinct tokens, some duplicated, some -1 pads."""
    rows = []
    for b in range(B):
        pos = torch.randperm(T, generator=gen)[: uniques[b]].tolist()
        pos += pos[:extra_dups] + [-1] * pads
        rows.append(pos)
    P = max(len(r) for r in rows)
    rows = [r + [-1] * (P - len(r)) for r in rows]
    out = torch.tensor(rows, dtype=torch.int64)
    return out[:, torch.randperm(P, generator=gen)]


def make_params(variant, r, d, wdtype, gen):
    spec = VARIANTS[variant]
    proj = torch.randn(r, d, generator=gen, dtype=torch.float64)
    if variant in ("loreft", "direft", "consreft", "lobireft"):
        proj = torch.linalg.qr(proj.t())[0].t().contiguous()  # orthonormal rows, like R
    else:
        proj = proj / d ** 0.5
    weight = torch.randn(r, d, generator=gen, dtype=torch.float64) / d ** 0.5 if spec.has_weight else None
    bias = torch.randn(r, generator=gen, dtype=torch.float64)
    proj_bias = torch.randn(r, generator=gen, dtype=torch.float64) if variant == "noreft" else None
    cast = lambda t: None if t is None else t.to(wdtype)  # noqa: E731
    # pyreft keeps the rotation in fp32 and W, b in the intervention dtype
    return proj.float(), cast(weight), cast(bias), cast(proj_bias)


def run(fn, hidden, positions, params, grad_out, device=None, **kw):
    """Output and gradients (hidden first, then every non-None parameter), returned on the CPU."""
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)  # noqa: E731
    h = to(hidden.detach().clone()).requires_grad_(True)
    ps = [None if p is None else to(p.detach().clone()).requires_grad_(True) for p in params]
    out = fn(h * 1.0, to(positions), *ps, **kw)  # `* 1.0`: in-place ops need a non-leaf input
    wrt = [h] + [p for p in ps if p is not None]
    grads = torch.autograd.grad(out, wrt, to(grad_out).to(out.dtype))
    return [out.detach().cpu()] + [g.detach().cpu() for g in grads]


def check_against_oracle(variant, backend, dtype, wdtype, r, d, B, T, uniques, act=None,
                         dropout=0.0, inplace=False, seed=1234, device=None):
    gen = torch.Generator().manual_seed(7 + r + d)
    positions = make_positions(B, T, uniques, gen=gen)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    params = make_params(variant, r, d, wdtype, gen)
    grad_out = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    kw = dict(variant=variant, act=act, dropout=dropout, seed=seed, inplace=inplace)
    # oracle: float64 everything (weights rounded to their working dtype first)
    params64 = [None if p is None else p.double() for p in params]
    oracle = run(reft_edit_reference, hidden.to(dtype).double(), positions, params64, grad_out, **kw)
    plain = run(reft_edit_reference, hidden.to(dtype), positions, params, grad_out, device=device, **kw)
    ours = run(reft_edit, hidden.to(dtype), positions, params, grad_out, backend=backend, device=device, **kw)
    names = ["out", "grad_hidden"] + [n for n, p in zip(["grad_proj", "grad_weight", "grad_bias", "grad_proj_bias"], params) if p is not None]
    for name, o, p, x in zip(names, oracle, plain, ours):
        assert x.dtype == p.dtype, f"{name}: dtype {x.dtype}, expected {p.dtype}"
        assert torch.isfinite(x).all(), name
        ref_err = (p.double() - o).abs().max().item()
        err = (x.double() - o).abs().max().item()
        atol = DTYPE_ATOL[x.dtype] * max(1.0, o.abs().max().item())
        assert err <= 2 * ref_err + atol, (
            f"{variant}/{backend}/{dtype}: {name} error {err:.3e} > 2 x plain-torch {ref_err:.3e} + {atol:.1e}")
    return positions, hidden, ours


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_variants_match_oracle(backend, variant, dtype):
    act = "gelu" if VARIANTS[variant].has_weight else None
    dropout = 0.0 if variant == "consreft" else 0.2
    # 5 + 4 + 4 unique rows: N = 13 (prime); d = 123 (odd)
    check_against_oracle(variant, backend, dtype, torch.float32, r=4, d=123, B=3, T=17,
                         uniques=[5, 4, 4], act=act, dropout=dropout)


@pytest.mark.skipif(CUDA is None, reason="needs a CUDA GPU (bf16 is checked on GPUs only)")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["torch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_variants_match_oracle_on_cuda(backend, variant, dtype):
    act = "silu" if VARIANTS[variant].has_weight else None
    dropout = 0.0 if variant == "consreft" else 0.1
    for r, d, B, T, uniques in [(4, 123, 3, 17, [5, 4, 4]), (16, 4096, 4, 64, [31, 29, 30, 1])]:
        check_against_oracle(variant, backend, dtype, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
                             r=r, d=d, B=B, T=T, uniques=uniques, act=act, dropout=dropout, device=CUDA)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [1, 4, 8, 16, 32])
def test_loreft_ranks(backend, r):
    check_against_oracle("loreft", backend, torch.float32, torch.float32, r=r, d=123, B=2, T=11,
                         uniques=[4, 3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_and_mixed_weight_dtypes(backend, inplace):
    # fp16 hidden with bf16 W, b and fp32 R: pyreft's default mix
    check_against_oracle("loreft", backend, torch.float16, torch.bfloat16, r=4, d=64, B=2, T=9,
                         uniques=[3, 4], inplace=inplace, dropout=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "silu", "tanh", "sigmoid", "gelu", None])
def test_activations(backend, act):
    check_against_oracle("loreft", backend, torch.float32, torch.float32, r=4, d=37, B=2, T=7,
                         uniques=[3, 2], act=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_selection_is_identity(backend, inplace):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=gen)
    positions = torch.full((2, 3), -1)
    params = make_params("loreft", 4, 16, torch.float32, gen)
    grad_out = torch.randn(2, 5, 16, generator=gen)
    out, gh, gp, gw, gb = run(reft_edit, hidden, positions, params, grad_out, backend=backend,
                              inplace=inplace, dropout=0.5, seed=3)
    assert torch.equal(out, hidden)
    assert torch.equal(gh, grad_out)
    assert not gp.any() and not gw.any() and not gb.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_positions_columns(backend):
    hidden = torch.randn(2, 5, 16)
    params = make_params("loreft", 4, 16, torch.float32, torch.Generator().manual_seed(0))
    out = reft_edit(hidden, torch.empty(2, 0, dtype=torch.long), *params, backend=backend)
    assert torch.equal(out, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlisted_rows_untouched_and_duplicates_edited_once(backend):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 32, generator=gen)
    params = make_params("loreft", 4, 32, torch.float32, gen)
    once = reft_edit(hidden, torch.tensor([[1, 4], [2, -1]]), *params, backend=backend)
    dup = reft_edit(hidden, torch.tensor([[4, 1, 1, 4], [2, 2, -1, 2]]), *params, backend=backend)
    assert torch.equal(once, dup)
    untouched = torch.ones(2, 6, dtype=torch.bool)
    untouched[0, [1, 4]] = False
    untouched[1, 2] = False
    assert torch.equal(once[untouched], hidden[untouched])
    assert not torch.allclose(once[~untouched], hidden[~untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_returns_input_and_out_of_place_does_not_mutate(backend):
    hidden = torch.randn(1, 4, 8)
    params = make_params("loreft", 2, 8, torch.float32, torch.Generator().manual_seed(0))
    before = hidden.clone()
    out = reft_edit(hidden, torch.tensor([[0, 2]]), *params, backend=backend)
    assert torch.equal(hidden, before) and out.data_ptr() != hidden.data_ptr()
    out2 = reft_edit(hidden, torch.tensor([[0, 2]]), *params, backend=backend, inplace=True)
    assert out2.data_ptr() == hidden.data_ptr() and torch.equal(hidden, out)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradcheck_torch_backend(variant):
    gen = torch.Generator().manual_seed(5)
    positions = torch.tensor([[0, 3, 3, -1], [4, 1, -1, -1]])
    hidden = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [None if p is None else p.double().requires_grad_(True)
              for p in make_params(variant, 3, 7, torch.float64, gen)]
    act = "tanh" if VARIANTS[variant].has_weight else None
    p = 0.0 if variant == "consreft" else 0.3

    def fn(h, *ps):
        it = iter(ps)
        full = [next(it) if q is not None else None for q in params]
        return reft_edit(h * 1.0, positions, *full, variant=variant, act=act, dropout=p, seed=11,
                         backend="torch", inplace=True)

    assert torch.autograd.gradcheck(fn, (hidden, *[q for q in params if q is not None]))


def test_dropout_mask_is_seeded_and_shared_by_forward_and_backward():
    hidden = torch.randn(2, 8, 64)
    positions = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    params = make_params("lobireft", 4, 64, torch.float32, torch.Generator().manual_seed(0))
    a = reft_edit(hidden, positions, *params, variant="lobireft", dropout=0.5, seed=9, backend="torch")
    b = reft_edit(hidden, positions, *params, variant="lobireft", dropout=0.5, seed=9, backend="torch")
    c = reft_edit(hidden, positions, *params, variant="lobireft", dropout=0.5, seed=10, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = canonical_rows(positions, 8)
    keep = dropout_keep_mask(9, rows, 64, 0.5)
    assert 0.4 < keep.float().mean().item() < 0.6
    # dropped elements of edited rows are exactly zero, kept ones scaled by 1/(1-p)
    edited = a.view(-1, 64)[rows]
    assert torch.equal(edited == 0, ~keep)


def test_philox_matches_triton_randint():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from reft_kernels.ops.variants import philox_randint

    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")

    @triton.jit
    def _randint(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        o64 = offs.to(tl.int64) * 4294967311  # exercise the high 32 bits of the counter
        tl.store(out_ptr + offs, tl.randint(seed, o64), mask=offs < n)

    n, seed = 300, 0x123456789AB
    out = torch.empty(n, dtype=torch.int32)
    _randint[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
    offs = torch.arange(n, dtype=torch.int64) * 4294967311
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, philox_randint(seed, offs))


# ------------------------------------------------------------------------------------------
def test_compiles_without_graph_breaks():
    params = make_params("loreft", 4, 32, torch.float32, torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 6, 32)
    positions = torch.tensor([[0, 5], [1, -1]])

    def step(h, R, W, b):
        return reft_edit(h, positions, R, W, b, backend="torch", dropout=0.1, seed=4).square().sum()

    ps = [p.clone().requires_grad_(True) for p in params[:3]]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, *ps)
    grads = torch.autograd.grad(loss, ps)
    ref_ps = [p.clone().requires_grad_(True) for p in params[:3]]
    ref_grads = torch.autograd.grad(step(hidden, *ref_ps), ref_ps)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


# ------------------------------------------------------------------------------------------
def _args(d=8, r=2, T=5):
    gen = torch.Generator().manual_seed(0)
    R, W, b, _ = make_params("loreft", r, d, torch.float32, gen)
    return torch.randn(2, T, d), torch.tensor([[0, 1], [2, -1]]), R, W, b


@pytest.mark.parametrize("bad, match", [
    (lambda h, p, R, W, b: (h, torch.tensor([[0, 5], [1, -1]]), R, W, b), r"positions contains 5.*T=5"),
    (lambda h, p, R, W, b: (h, torch.tensor([[0, -2], [1, -1]]), R, W, b), r"positions contains -2"),
    (lambda h, p, R, W, b: (h, p.float(), R, W, b), r"positions has dtype torch.float32.*long"),
    (lambda h, p, R, W, b: (h, p[:1], R, W, b), r"positions must have shape \(B, P\) = \(2, P\)"),
    (lambda h, p, R, W, b: (h, p, R[:, :7], W, b), r"rotation/proj must have shape .*\(r, 8\)"),
    (lambda h, p, R, W, b: (h, p, R, W[:1], b), r"weight must have shape \(r, d\) = \(2, 8\)"),
    (lambda h, p, R, W, b: (h, p, R, W, b[:1]), r"bias must have shape \(r,\) = \(2,\)"),
    (lambda h, p, R, W, b: (h.long(), p, R, W, b), r"hidden has dtype torch.int64"),
    (lambda h, p, R, W, b: (h[0], p, R, W, b), r"hidden must have shape \(B, T, d\)"),
    (lambda h, p, R, W, b: (h, p.to("meta"), R, W, b), r"positions is on meta"),
    (lambda h, p, R, W, b: (h, p, R.to("meta"), W, b), r"rotation/proj is on meta"),
])
def test_bad_input_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reft_edit(*bad(*_args()), backend="torch")


def test_bad_options():
    h, p, R, W, b = _args()
    with pytest.raises(ValueError, match=r"dropout=1.5 must be in \[0, 1\)"):
        reft_edit(h, p, R, W, b, dropout=1.5)
    with pytest.raises(ValueError, match=r"act='elu' is not supported"):
        reft_edit(h, p, R, W, b, act="elu")
    with pytest.raises(ValueError, match=r"backend='cuda' is unknown"):
        reft_edit(h, p, R, W, b, backend="cuda")
    with pytest.raises(ValueError, match=r"variant='lora' is unknown"):
        reft_edit(h, p, R, W, b, variant="lora")
    with pytest.raises(ValueError, match=r"consreft has no dropout"):
        reft_edit(h, p, R, None, b, variant="consreft", dropout=0.1)
    with pytest.raises(ValueError, match=r"inplace=True needs a contiguous"):
        reft_edit(h.transpose(0, 1).contiguous().transpose(0, 1), p, R, W, b, inplace=True)


def test_env_var_overrides_auto(monkeypatch):
    from reft_kernels.ops import resolve_backend

    monkeypatch.setenv("REFT_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend='bogus' is unknown"):
        resolve_backend("auto", torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_without_hidden_grad(backend):
    """A hidden state that needs no gradient takes the gathered-rows backward: same weight grads."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 33, generator=gen)
    positions = make_positions(3, 7, [3, 2, 4], gen=gen)
    grad_out = torch.randn(3, 7, 33, generator=gen)
    params = make_params("noreft", 4, 33, torch.float32, gen)
    with_h = run(reft_edit, hidden, positions, params, grad_out, variant="noreft", act="silu", backend=backend)
    ps = [p.clone().requires_grad_(True) for p in params]
    out = reft_edit(hidden.clone(), positions, *ps, variant="noreft", act="silu", backend=backend, inplace=True)
    without_h = torch.autograd.grad(out, ps, grad_out)
    for g, ref in zip(without_h, with_h[2:]):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["loreft", "noreft", "lobireft"])
@pytest.mark.parametrize("B, T, P", [(2, 0, 3), (0, 5, 2), (2, 5, 0), (0, 0, 0)])
def test_empty_inputs_behave_alike_on_every_backend(backend, variant, B, T, P):
    """No rows, no tokens or no positions: the input back unchanged, its gradient passed through,
    zero weight gradients, on every backend (the torch backend used to raise on T = 0)."""
    params = [None if p is None else p.requires_grad_(True)
              for p in make_params(variant, 4, 16, torch.float32, torch.Generator().manual_seed(0))]
    hidden = torch.randn(B, T, 16, requires_grad=True)
    positions = torch.full((B, P), -1) if T == 0 else torch.arange(P).repeat(B, 1).reshape(B, P)
    dropout = 0.0 if variant == "consreft" else 0.2
    out = reft_edit(hidden * 1.0, positions, *params, variant=variant, dropout=dropout, seed=2,
                    backend=backend)
    assert out.shape == (B, T, 16) and torch.equal(out, hidden)
    grad_out = torch.randn_like(out)
    live = [p for p in params if p is not None]
    grads = torch.autograd.grad(out, [hidden] + live, grad_out)
    assert torch.equal(grads[0], grad_out)
    assert all(g.shape == p.shape and not g.any() for g, p in zip(grads[1:], live))
