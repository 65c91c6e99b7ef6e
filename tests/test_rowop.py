"""Per-row adapters (reft_edit_multi) against a float64 oracle, for every backend.

The oracle is an independent path: a Python loop over batch rows that applies the
single-adapter reference (reft_edit_reference) with that row's adapter, sliced to its TRUE rank
(no padding), so padded ranks are checked to be exact. Tolerance rule as tests/test_ops.py: the
backend's error is at most twice plain PyTorch's (the same loop at the working precision) plus
a small atol.
"""
import pytest
import torch

from reft_kernels.ops import VARIANTS, reft_edit, reft_edit_multi
from reft_kernels.ops.reference import reft_edit_reference
from test_ops import CUDA, DTYPE_ATOL, available_backends, make_params, make_positions


BACKENDS = available_backends()          # every backend runs the per-row op
CUDA_BACKENDS = available_backends(CUDA) if CUDA is not None else []


def make_stack(variant, ranks, d, wdtype, gen):
    """Stacked (A, r_max, d) / (A, r_max) weights, each adapter zero-padded beyond its rank."""
    r_max = max(ranks)
    per = [make_params(variant, r, d, wdtype, gen) for r in ranks]
    stacked = []
    for i in range(4):
        if per[0][i] is None:
            stacked.append(None)
            continue
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, r_max - t.shape[0]) if t.dim() == 2  # noqa: E731
                                                else (0, r_max - t.shape[0]))
        stacked.append(torch.stack([pad(p[i]) for p in per]))
    return stacked


def oracle_multi(hidden, positions, stack_ids, proj, weight, bias, proj_bias, *, ranks, **kw):
    """Row by row: the single-adapter reference with the row's adapter at its true rank."""
    outs = []
    for b, a in enumerate(stack_ids.tolist()):
        if a < 0:
            outs.append(hidden[b] * 1.0)
            continue
        r = ranks[a]
        cut = lambda t: None if t is None else t[a, :r]  # noqa: E731
        only_b = torch.full_like(positions, -1)     # whole batch, only row b listed: the flat
        only_b[b] = positions[b]                    # row ids (and dropout masks) stay b * T + t
        outs.append(reft_edit_reference(hidden, only_b, cut(proj), cut(weight), cut(bias),
                                        cut(proj_bias), **kw)[b])
    return torch.stack(outs) if outs else hidden * 1.0


def run(fn, hidden, positions, ids, params, grad_out, device=None, **kw):
    """Output and gradients (hidden, then every non-None stacked weight), on the CPU."""
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)  # noqa: E731
    h = to(hidden.detach().clone()).requires_grad_(True)
    ps = [None if p is None else to(p.detach().clone()).requires_grad_(True) for p in params]
    out = fn(h * 1.0, to(positions), to(ids), *ps, **kw)
    wrt = [h] + [p for p in ps if p is not None]
    grads = torch.autograd.grad(out, wrt, to(grad_out).to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return [out.detach().cpu()] + [g.detach().cpu() for g in grads]


def check_multi(variant, backend, dtype, ranks, ids, d=123, T=11, act=None, dropout=0.0,
                inplace=False, wdtype=torch.float32, pass_ranks=True, device=None, seed=77):
    gen = torch.Generator().manual_seed(3 + d + len(ranks) + len(ids))
    B = len(ids)
    positions = make_positions(B, T, [1 + (3 * b) % min(T, 6) for b in range(B)], gen=gen)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    params = make_stack(variant, ranks, d, wdtype, gen)
    stack_ids = torch.tensor(ids, dtype=torch.int64)
    kw = dict(variant=variant, act=act, dropout=dropout, seed=seed)
    params64 = [None if p is None else p.double() for p in params]
    oracle = run(oracle_multi, hidden.to(dtype).double(), positions, stack_ids, params64,
                 grad_out, ranks=ranks, **kw)
    plain = run(oracle_multi, hidden.to(dtype), positions, stack_ids, params, grad_out,
                ranks=ranks, **kw)
    rank_t = torch.tensor(ranks, device=device) if pass_ranks else None
    ours = run(reft_edit_multi, hidden.to(dtype), positions, stack_ids, params, grad_out,
               device=device, backend=backend, inplace=inplace, ranks=rank_t, **kw)
    names = ["out", "grad_hidden"] + [n for n, p in zip(
        ["grad_proj", "grad_weight", "grad_bias", "grad_proj_bias"], params) if p is not None]
    errors = {}
    for name, o, p, x in zip(names, oracle, plain, ours):
        assert x.dtype == p.dtype, f"{name}: dtype {x.dtype}, expected {p.dtype}"
        assert torch.isfinite(x).all(), name
        ref_err = (p.double() - o).abs().max().item() if o.numel() else 0.0
        err = (x.double() - o).abs().max().item() if o.numel() else 0.0
        atol = DTYPE_ATOL[x.dtype] * max(1.0, o.abs().max().item() if o.numel() else 0.0)
        errors[name] = (err, ref_err)
        assert err <= 2 * ref_err + atol, (
            f"{variant}/{backend}/{dtype}: {name} error {err:.3e} > 2 x plain-torch {ref_err:.3e} + {atol:.1e}")
    return errors, ours, hidden, positions


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_variants_match_oracle(backend, variant, dtype):
    act = "gelu" if VARIANTS[variant].has_weight else None
    dropout = 0.0 if variant == "consreft" else 0.2
    # A = 3 adapters of ranks 4, 2, 3 (zero-padded to 4); rows without an adapter; d = 123
    check_multi(variant, backend, dtype, ranks=[4, 2, 3], ids=[2, 0, -1, 1, 2], act=act,
                dropout=dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks, ids", [
    ([3], [0, 0, -1]),
    ([4, 1, 4], [1, 2, 0, 2, -1, 1, 0]),
    ([2, 5, 3, 1, 4], [4, 0, 3, 3, 1, -1, 2, 4, 0, 1, 2]),
    ([2, 2, 2, 2, 2], [3, -1]),            # adapters without rows get zero gradients
])
def test_adapter_counts_and_mixed_ranks(backend, ranks, ids):
    check_multi("loreft", backend, torch.float32, ranks=ranks, ids=ids, d=37, act="silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "tanh", None])
def test_padded_ranks_exact_without_ranks_argument(backend, act):
    # act(0) == 0: the padding stays exact (and its gradient zero) with no `ranks`
    check_multi("noreft", backend, torch.float32, ranks=[3, 1], ids=[1, 0, 1], d=29, act=act,
                pass_ranks=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_sigmoid_padding_needs_ranks(backend, inplace):
    errors, ours, *_ = check_multi("direft", backend, torch.float32, ranks=[3, 1], ids=[1, 0, 1],
                                   d=29, act="sigmoid", inplace=inplace)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 29, generator=gen)
    params = [p.requires_grad_(True) if p is not None else None
              for p in make_stack("direft", [3, 1], 29, torch.float32, gen)]
    out = reft_edit_multi(hidden, torch.tensor([[0, 2], [1, 4]]), torch.tensor([1, 1]), *params,
                          variant="direft", act="sigmoid", backend=backend)
    out.sum().backward()
    # without `ranks`, sigmoid(0) = 0.5 leaks a gradient into the padded rows of R (documented)
    assert params[0].grad[1, 1:].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_weight_dtypes_fp16_hidden(backend):
    check_multi("loreft", backend, torch.float16, ranks=[4, 2], ids=[0, 1, 1, -1], d=64,
                wdtype=torch.bfloat16, dropout=0.1, inplace=True)


@pytest.mark.skipif(CUDA is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["torch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_variants_match_oracle_on_cuda(backend, variant, dtype):
    act = "silu" if VARIANTS[variant].has_weight else None
    dropout = 0.0 if variant == "consreft" else 0.1
    check_multi(variant, backend, dtype, ranks=[4, 2, 3, 1, 4], ids=[2, 0, -1, 1, 4, 4, 3],
                act=act, dropout=dropout, device=CUDA,
                wdtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    check_multi(variant, backend, dtype, ranks=[16] * 3, ids=[0, 1, 2, 1], d=1024, T=40,
                act=act, dropout=dropout, device=CUDA)


# ------------------------------------------------------------------------------------------
def _stack(variant="loreft", ranks=(3, 2, 3), d=16, seed=0):
    return make_stack(variant, list(ranks), d, torch.float32, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, P, ids", [
    (0, 5, 2, []),                   # no batch rows
    (2, 0, 3, [0, 1]),               # no tokens (positions all -1)
    (2, 5, 0, [1, 2]),               # no positions
    (3, 5, 2, [-1, -1, -1]),         # no row has an adapter
])
def test_empty_inputs_are_identity(backend, B, T, P, ids):
    params = [p.requires_grad_(True) for p in _stack(d=16)[:3]]
    hidden = torch.randn(B, T, 16, requires_grad=True)
    positions = torch.full((B, P), -1) if T == 0 else torch.arange(P).repeat(B, 1).reshape(B, P)
    out = reft_edit_multi(hidden * 1.0, positions, torch.tensor(ids, dtype=torch.long), *params,
                          dropout=0.3, seed=1, backend=backend)
    assert out.shape == hidden.shape and torch.equal(out, hidden)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden] + params, grad_out)
    assert torch.equal(grads[0], grad_out)
    assert all(g.shape == p.shape and not g.any() for g, p in zip(grads[1:], params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_per_row_equals_single_adapter_op(backend):
    """All rows on adapter a == reft_edit with adapter a's slice (same positions, dups, pads)."""
    gen = torch.Generator().manual_seed(4)
    P, W, b, _ = make_stack("loreft", [4, 4, 4], 33, torch.float32, gen)
    hidden = torch.randn(3, 9, 33, generator=gen)
    positions = make_positions(3, 9, [4, 2, 5], gen=gen)
    for a in range(3):
        multi = reft_edit_multi(hidden, positions, torch.full((3,), a), P, W, b, act="tanh",
                                dropout=0.1, seed=5, backend=backend)
        single = reft_edit(hidden, positions, P[a], W[a], b[a], act="tanh", dropout=0.1, seed=5,
                           backend=backend)
        torch.testing.assert_close(multi, single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_training_step_updates_each_adapter_from_its_own_rows(backend):
    """One SGD step on a mixed batch == for each adapter, a step on its own rows only."""
    gen = torch.Generator().manual_seed(8)
    stack = make_stack("noreft", [2, 4, 3], 24, torch.float32, gen)
    hidden = torch.randn(6, 7, 24, generator=gen)
    positions = make_positions(6, 7, [3, 2, 4, 1, 3, 2], gen=gen)
    ids = torch.tensor([2, 0, 2, -1, 1, 0])
    target = torch.randn(6, 7, 24, generator=gen)

    def step(rows):
        ps = [p.clone().requires_grad_(True) for p in stack]
        out = reft_edit_multi(hidden[rows], positions[rows], ids[rows], *ps, variant="noreft",
                              act="relu", ranks=torch.tensor([2, 4, 3]), backend=backend)
        ((out - target[rows]) ** 2).sum().backward()
        return [p.detach() - 0.1 * p.grad for p in ps]

    mixed = step(torch.arange(6))
    for a in range(3):
        own = step((ids == a).nonzero().flatten())
        for m, o, p in zip(mixed, own, stack):
            torch.testing.assert_close(m[a], o[a], rtol=1e-5, atol=1e-6)
            others = [x for x in range(3) if x != a]
            assert torch.equal(o[others], p[others])   # other adapters' slices untouched


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(2)
    stack = [p.requires_grad_(True) for p in make_stack("loreft", [4, 2, 3, 4, 1], 40, torch.float32, gen)[:3]]
    hidden = torch.randn(8, 6, 40, generator=gen)
    positions = make_positions(8, 6, [3] * 8, gen=gen)
    ids = torch.tensor([0, 4, 4, 1, 2, 3, 0, 4])
    results = []
    for _ in range(2):
        out = reft_edit_multi(hidden, positions, ids, *stack, backend=backend)
        results.append([out] + list(torch.autograd.grad(out.square().sum(), stack)))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_gradcheck_torch_backend():
    gen = torch.Generator().manual_seed(5)
    positions = torch.tensor([[0, 3, 3, -1], [4, 1, -1, -1], [2, 2, 0, 1]])
    hidden = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    stack = [p.double().requires_grad_(True) for p in make_stack("noreft", [3, 2], 7, torch.float64, gen)]
    ids = torch.tensor([1, -1, 0])
    fn = lambda h, *ps: reft_edit_multi(h * 1.0, positions, ids, *ps, variant="noreft", act="tanh",  # noqa: E731
                                        dropout=0.3, seed=11, backend="torch", inplace=True)
    assert torch.autograd.gradcheck(fn, (hidden, *stack))


def test_compiles_without_graph_breaks():
    stack = _stack(d=32)[:3]
    hidden = torch.randn(3, 6, 32)
    positions = torch.tensor([[0, 5], [1, -1], [2, 2]])
    ids = torch.tensor([2, -1, 0])

    def step(h, R, W, b):
        return reft_edit_multi(h, positions, ids, R, W, b, backend="torch", dropout=0.1,
                               seed=4).square().sum()

    ps = [p.clone().requires_grad_(True) for p in stack]
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, *ps)
    grads = torch.autograd.grad(loss, ps)
    ref_ps = [p.clone().requires_grad_(True) for p in stack]
    for g, rg in zip(grads, torch.autograd.grad(step(hidden, *ref_ps), ref_ps)):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("bad, match", [
    (dict(stack_ids=torch.tensor([0, 3])), r"stack_ids contains 3, outside \[-1, 3\)"),
    (dict(stack_ids=torch.tensor([0, -2])), r"stack_ids contains -2"),
    (dict(stack_ids=torch.tensor([0])), r"stack_ids must have shape \(B,\) = \(2,\)"),
    (dict(stack_ids=torch.tensor([0.0, 1.0])), r"stack_ids has dtype torch.float32"),
    (dict(stack_ids=[0, 1]), r"stack_ids must be an integer torch.Tensor"),
    (dict(proj=torch.zeros(3, 16)), r"rotation/proj must be the stacked \(A, r_max, d\)"),
    (dict(proj=torch.zeros(0, 3, 16)), r"A=0 adapters"),
    (dict(proj=torch.zeros(3, 3, 15)), r"rotation/proj must have shape \(A, r_max, d\) = \(3, 3, 16\)"),
    (dict(weight=torch.zeros(2, 3, 16)), r"weight must have shape \(3, 3, 16\)"),
    (dict(bias=torch.zeros(3, 2)), r"bias must have shape \(3, 3\)"),
    (dict(weight=None), r"weight is required"),
    (dict(ranks=torch.tensor([3, 4, 1])), r"ranks contains 4.*r_max=3"),
    (dict(ranks=torch.tensor([3, 1])), r"ranks must be an integer tensor of shape \(A,\) = \(3,\)"),
])
def test_bad_input_errors(bad, match):
    R, W, b, _ = _stack(d=16)
    kw = dict(hidden=torch.randn(2, 5, 16), positions=torch.tensor([[0, 1], [2, -1]]),
              stack_ids=torch.tensor([0, 2]), proj=R, weight=W, bias=b)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        reft_edit_multi(**kw, backend="torch")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
def test_triton_several_parts_per_adapter(monkeypatch):
    """Force K > 1 row parts per adapter in the column kernel: still the oracle, and deterministic."""
    from reft_kernels.ops import triton_common
    monkeypatch.setattr(triton_common, "MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(triton_common, "TARGET_PROGRAMS", 8)   # d=40: 2 column chunks x 2 x 2 parts
    ids = [0, 1] * 9
    errors, first, *_ = check_multi("noreft", "triton", torch.float32, ranks=[3, 2], ids=ids, d=40,
                                    T=10, act="sigmoid", dropout=0.25)
    _, second, *_ = check_multi("noreft", "triton", torch.float32, ranks=[3, 2], ids=ids, d=40,
                                T=10, act="sigmoid", dropout=0.25)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stack_adapters_trains_each_adapters_own_parameters(backend):
    """stack_adapters + reft_edit_multi == each adapter applied alone (reft_edit) on its rows,
    outputs and the gradients of each adapter's unpadded parameters."""
    from reft_kernels.ops import stack_adapters
    gen = torch.Generator().manual_seed(12)
    adapters = [[p.requires_grad_(True) for p in make_params("loreft", r, 20, torch.float32, gen)[:3]]
                for r in (3, 1, 2)]
    hidden = torch.randn(4, 6, 20, generator=gen)
    positions = make_positions(4, 6, [2, 3, 1, 2], gen=gen)
    ids = torch.tensor([2, 0, -1, 0])
    R, W, b, c, ranks = stack_adapters([(*a, None) for a in adapters])
    assert R.shape == (3, 3, 20) and c is None and ranks.tolist() == [3, 1, 2]
    out = reft_edit_multi(hidden, positions, ids, R, W, b, ranks=ranks, act="relu", backend=backend)
    grads = torch.autograd.grad(out.square().sum(), [p for a in adapters for p in a])
    for i, a in enumerate(ids.tolist()):
        expect = hidden[i] if a < 0 else reft_edit(hidden[i:i + 1], positions[i:i + 1], *adapters[a],
                                                   act="relu", backend="torch")[0]
        torch.testing.assert_close(out[i], expect, rtol=1e-5, atol=1e-5)
    rows_of = {a: (ids == a).nonzero().flatten() for a in range(3)}
    for a, adapter in enumerate(adapters):
        sel = rows_of[a]
        if not len(sel):
            continue
        ref_out = reft_edit(hidden[sel], positions[sel], *adapter, act="relu", backend="torch")
        ref = torch.autograd.grad(ref_out.square().sum(), adapter)
        for g, rg in zip(grads[3 * a: 3 * a + 3], ref):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)
    assert not any(g.any() for g in grads[3:6])   # adapter 1 has no rows


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_torch_backend_gather_path_for_wide_stacks(monkeypatch, variant):
    """Stacks wider than DENSE_MAX_WIDTH take the gathered-slices path: same oracle."""
    from reft_kernels.ops import torch_backend
    monkeypatch.setattr(torch_backend, "DENSE_MAX_WIDTH", 0)
    act = "gelu" if VARIANTS[variant].has_weight else None
    check_multi(variant, "torch", torch.float32, ranks=[4, 2, 3], ids=[2, 0, -1, 1, 2], d=41,
                act=act, dropout=0.0 if variant == "consreft" else 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_without_hidden_grad(backend):
    """A hidden state that needs no gradient takes the gathered-rows backward: same weight grads."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 7, 33, generator=gen)
    positions = make_positions(4, 7, [3, 2, 4, 1], gen=gen)
    ids = torch.tensor([1, 0, -1, 1])
    grad_out = torch.randn(4, 7, 33, generator=gen)
    stack = make_stack("noreft", [4, 2], 33, torch.float32, gen)
    with_h = run(reft_edit_multi, hidden, positions, ids, stack, grad_out, variant="noreft",
                 act="silu", backend=backend)
    ps = [p.clone().requires_grad_(True) for p in stack]
    out = reft_edit_multi(hidden.clone(), positions, ids, *ps, variant="noreft", act="silu",
                          backend=backend, inplace=True)
    for g, ref in zip(torch.autograd.grad(out, ps, grad_out), with_h[2:]):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
