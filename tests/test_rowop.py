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
from reft_kernels.ops.autograd import get_backend
from reft_kernels.ops.reference import reft_edit_reference
from test_ops import CUDA, DTYPE_ATOL, make_params, make_positions


def multi_backends(device=torch.device("cpu")):
    names = []
    for name in ("torch", "triton", "native"):
        try:
            mod = get_backend(name)
        except Exception:  # noqa: BLE001 - not importable here
            continue
        if getattr(mod, "is_available", lambda d: True)(device) and \
                getattr(mod, "multi_available", lambda d: True)(device):
            names.append(name)
    return names


BACKENDS = multi_backends()
CUDA_BACKENDS = multi_backends(CUDA) if CUDA is not None else []


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


def oracle_multi(hidden, positions, adapter_ids, proj, weight, bias, proj_bias, *, ranks, **kw):
    """Row by row: the single-adapter reference with the row's adapter at its true rank."""
    outs = []
    for b, a in enumerate(adapter_ids.tolist()):
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
    adapter_ids = torch.tensor(ids, dtype=torch.int64)
    kw = dict(variant=variant, act=act, dropout=dropout, seed=seed)
    params64 = [None if p is None else p.double() for p in params]
    oracle = run(oracle_multi, hidden.to(dtype).double(), positions, adapter_ids, params64,
                 grad_out, ranks=ranks, **kw)
    plain = run(oracle_multi, hidden.to(dtype), positions, adapter_ids, params, grad_out,
                ranks=ranks, **kw)
    rank_t = torch.tensor(ranks, device=device) if pass_ranks else None
    ours = run(reft_edit_multi, hidden.to(dtype), positions, adapter_ids, params, grad_out,
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
