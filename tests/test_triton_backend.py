"""Triton-specific checks of reft_kernels.ops.triton_backend (the launchers, called directly).

Numerics are compared with the torch backend (its semantic twin) under the flash-attention rule:
the triton error against a float64 run is at most twice the torch backend's error at the same
precision, plus a small atol. On CPU the kernels run in the Triton interpreter, so shapes stay
small. The numerics of the public ops against the float64 oracle are in test_ops.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from reft_kernels.ops import torch_backend
from reft_kernels.ops.variants import ACT_IDS, VARIANTS, dropout_keep_mask

triton_backend = pytest.importorskip("reft_kernels.ops.triton_backend")
from reft_kernels.ops import triton_common  # noqa: E402
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.is_available(DEVICE):
    pytest.skip(triton_backend.unavailable_reason(DEVICE), allow_module_level=True)

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def make_case(variant, r, d, M=40, N=14, n_skip=3, seed=0):
    """float64 hidden (M, d), upstream grad, unique rows (N,) with n_skip entries -1, and params."""
    gen = torch.Generator().manual_seed(seed + 31 * r + d)
    spec = VARIANTS[variant]
    x = torch.randn(M, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(M, d, generator=gen, dtype=torch.float64)
    rows = torch.randperm(M, generator=gen)[:N]
    rows[torch.randperm(N, generator=gen)[:n_skip]] = -1
    proj = torch.randn(r, d, generator=gen, dtype=torch.float64) / d ** 0.5
    weight = torch.randn(r, d, generator=gen, dtype=torch.float64) / d ** 0.5 if spec.has_weight else None
    bias = torch.randn(r, generator=gen, dtype=torch.float64)
    proj_bias = torch.randn(r, generator=gen, dtype=torch.float64) if variant == "noreft" else None
    return x, grad, rows, [proj, weight, bias, proj_bias]


def run_rows(backend, x, grad, rows, params, variant, act, p, seed, dtype, pdtypes):
    """Forward + backward through one backend's launchers; outputs in a comparable list."""
    spec = VARIANTS[variant]
    x2d = x.to(DEVICE, dtype).clone()
    ps = [None if t is None else t.to(DEVICE, dt) for t, dt in zip(params, pdtypes)]
    rows = rows.to(DEVICE)
    saved = forward_one(backend, x2d, rows, *ps, spec, act, p, seed)
    g2d = grad.to(DEVICE, dtype).clone()
    ps = [None if t is None else t.unsqueeze(0) for t in ps]     # the A = 1 stack
    grads = backend.backward_rows(g2d, rows, torch.zeros_like(rows), saved, *ps, spec, act, p, seed)
    return [x2d, saved[rows >= 0], g2d] + [g[0] for g in grads if g is not None]


def forward_one(backend, x2d, rows, *args):
    """A backend's forward launcher with one adapter: 2-D proj/weight, 1-D bias/proj_bias."""
    ps = [None if t is None else t.unsqueeze(0) for t in args[:4]]
    return backend.forward_rows(x2d, rows, torch.zeros_like(rows), *ps, *args[4:])


def assert_matches_torch(variant, act, p, dtype, pdtypes, r, d, **case_kw):
    x, grad, rows, params = make_case(variant, r, d, **case_kw)
    args = (x, grad, rows, params, variant, act, p, 1234)
    exact = run_rows(torch_backend, *args, torch.float64, [torch.float64] * 4)
    eager = run_rows(torch_backend, *args, dtype, pdtypes)
    fused = run_rows(triton_backend, *args, dtype, pdtypes)
    assert len(fused) == len(exact)
    names = ["out", "saved", "grad_h", "grad_proj", "grad_weight/bias", "grad_bias", "grad_c"]
    for name, e, t, f in zip(names, exact, eager, fused):
        assert f.shape == e.shape, name
        err_t = (t.double() - e).abs().max().item()
        err_f = (f.double() - e).abs().max().item()
        assert err_f <= 2 * err_t + ATOL[dtype], f"{name}: triton err {err_f:.3g} vs torch {err_t:.3g}"


FP32 = (torch.float32, [torch.float32] * 4)
FP16_FP32_WEIGHTS = (torch.float16, [torch.float32] * 4)
BF16_PYREFT = (torch.bfloat16, [torch.float32] + [torch.bfloat16] * 3)  # R fp32, W, b bf16
DTYPES = {"fp32": FP32, "fp16-fp32w": FP16_FP32_WEIGHTS, "bf16-pyreft": BF16_PYREFT}


@pytest.mark.parametrize("dtypes", ["fp32", "fp16-fp32w"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_torch_backend(variant, dtypes):
    spec = VARIANTS[variant]
    act = "gelu" if spec.has_weight else "linear"
    p = 0.2 if spec.has_dropout else 0.0
    assert_matches_torch(variant, act, p, *DTYPES[dtypes], r=4, d=48)


@pytest.mark.parametrize("dtypes", ["fp32", "fp16-fp32w"])
@pytest.mark.parametrize("act", sorted(ACT_IDS))
def test_activations_match_torch_backend(act, dtypes):
    assert_matches_torch("noreft", act, 0.1, *DTYPES[dtypes], r=3, d=40)


def test_bf16_hidden_with_pyreft_weight_dtypes():
    assert_matches_torch("loreft", "gelu", 0.1, *DTYPES["bf16-pyreft"], r=4, d=40)


@pytest.mark.parametrize("variant", ["loreft", "direft"])
@pytest.mark.parametrize("r", [1, 32])
def test_ranks_with_odd_width(r, variant):
    assert_matches_torch(variant, "silu", 0.1, *FP32, r=r, d=123, N=7)


def test_rows_wider_than_one_chunk(monkeypatch):
    """8-row tiles make 128-column chunks, so d = 150 takes a full and a masked chunk."""
    monkeypatch.setattr(triton_common, "TARGET_PROGRAMS", 2)
    assert triton_common.row_tiles(14, 150)[1]["BLOCK_D"] == 128
    assert_matches_torch("noreft", "gelu", 0.3, *FP32, r=3, d=150)


def test_float64_matches_torch_backend_tightly():
    assert_matches_torch("noreft", "tanh", 0.3, torch.float64, [torch.float64] * 4, r=5, d=33)


def test_transposed_rotation_view():
    """pyreft stores the rotation as a (d, r) weight; R = weight.t() is a non-contiguous view."""
    x, grad, rows, (proj, weight, bias, _) = make_case("loreft", 4, 37)
    params = [proj.t().contiguous().t(), weight, bias, None]
    assert not params[0].is_contiguous()
    args = (x, grad, rows, params, "loreft", "relu", 0.0, 0, torch.float32, [torch.float32] * 4)
    for f, t in zip(run_rows(triton_backend, *args), run_rows(torch_backend, *args)):
        torch.testing.assert_close(f, t, atol=1e-5, rtol=1e-5)


def test_dropout_mask_is_exactly_the_philox_mask():
    """With b = 0, LobiReFT is pure dropout: the zeros of out and grad_h are exactly the mask."""
    d, p, seed = 123, 0.4, 2**62 - 57
    x, grad, rows, (proj, _, bias, _) = make_case("lobireft", 2, d, n_skip=0)
    x, grad = x.float() + 3.0, grad.float() + 3.0          # no accidental zeros
    params = [proj.float(), None, torch.zeros_like(bias).float(), None]
    x2d, saved, g2d, *_ = run_rows(triton_backend, x, grad, rows, params, "lobireft", "linear", p,
                                   seed, torch.float32, [torch.float32] * 4)
    keep = dropout_keep_mask(seed, rows, d, p).to(DEVICE)
    assert torch.equal(x2d[rows] != 0, keep)
    assert torch.equal(g2d[rows] != 0, keep)
    assert 0.3 < 1 - keep.float().mean().item() < 0.5
    eager = x.to(DEVICE).clone()
    on_device = [None if t is None else t.to(DEVICE) for t in params]
    forward_one(torch_backend, eager, rows.to(DEVICE), *on_device, VARIANTS["lobireft"], "linear",
                p, seed)
    assert torch.equal(x2d, eager)


def test_weight_grads_are_bit_reproducible_across_row_splits(monkeypatch):
    """Force several row splits; results are deterministic and still match the torch backend."""
    monkeypatch.setattr(triton_common, "MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(triton_common, "TARGET_PROGRAMS", 8)
    kw = dict(r=5, d=40, M=60, N=40)  # 2 splits of <= 32 rows; row kernels get BLOCK_N = 8
    x, grad, rows, params = make_case("noreft", **kw)
    args = (x, grad, rows, params, "noreft", "sigmoid", 0.25, 7, torch.float32, [torch.float32] * 4)
    first, second = run_rows(triton_backend, *args), run_rows(triton_backend, *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert_matches_torch("noreft", "sigmoid", 0.25, *FP32, **kw)


@pytest.mark.parametrize("variant", ["noreft", "lobireft"])
@pytest.mark.parametrize("n_rows", [0, 5])
def test_no_rows_or_all_rows_skipped(variant, n_rows):
    spec, r, d = VARIANTS[variant], 3, 20
    x, grad, _, params = make_case(variant, r, d)
    rows = torch.full((n_rows,), -1, dtype=torch.int64)
    x2d, saved, g2d, *grads = run_rows(triton_backend, x, grad, rows, params, variant, "linear",
                                       0.0, 0, torch.float32, [torch.float32] * 4)
    assert torch.equal(x2d, x.to(DEVICE, torch.float32)) and torch.equal(g2d, grad.to(DEVICE, torch.float32))
    assert saved.shape == (0, d)
    shapes = [(r, d)] + [(r, d)] * spec.has_weight + [(r,)] + [(r,)] * (variant == "noreft")
    assert [tuple(g.shape) for g in grads] == shapes
    assert all(g.dtype == torch.float32 and not g.any() for g in grads)


def test_rank_above_limit_is_a_clear_error():
    r = triton_backend.MAX_RANK + 1
    x2d = torch.zeros(4, 16, device=DEVICE)
    proj = torch.zeros(r, 16, device=DEVICE)
    rows = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match=r"r=257.*backend='torch'"):
        forward_one(triton_backend, x2d, rows, proj, None, torch.zeros(r, device=DEVICE), None,
                    VARIANTS["lobireft"], "linear", 0.0, 0)


WITHOUT_INTERPRETER = """
import os
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from reft_kernels.ops import triton_backend as tb

cpu = torch.device("cpu")
print(tb.is_available(cpu), tb.unavailable_reason(cpu))
os.environ["TRITON_INTERPRET"] = "1"          # too late: the kernels are already built
print(tb.is_available(cpu), tb.unavailable_reason(cpu))
print(tb.is_available(torch.device("meta")), flush=True)

TYPES = dict(rows_ptr="*i64", p_ptr="*fp32", w_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16",
             n_rows="i32", rows_per_split="i32", d="i32", r="i32", stride_p0="i32",
             stride_p1="i32", stride_w0="i32", stride_w1="i32", seed="i64", threshold="i32",
             ad_ptr="*i64", order_ptr="*i64", starts_ptr="*i64", n_parts="i32", stride_pa="i32",
             stride_wa="i32", stride_ba="i32", stride_ca="i32",
             scale="fp64", **{k: "*bf16" for k in ("x_ptr", "g_ptr", "saved_ptr")},
             **{k: "*fp32" for k in ("s_ptr", "u_ptr", "v_ptr", "gp_ptr", "gw_ptr", "gb_ptr", "gc_ptr")})
SWITCHES = dict(ACT=3, HAS_WEIGHT=True, SUBTRACT_PROJ=True, HAS_PROJ_BIAS=True, HAS_DROPOUT=True,
                ACC=tl.float32, R_PAD=16)
for cap in (80, 90):
    for fn, tiles, warps in ((tb._forward_kernel, dict(BLOCK_N=2, BLOCK_D=512), 4),
                             (tb._backward_rows_kernel, dict(BLOCK_N=8, BLOCK_D=128), 4),
                             (tb._backward_cols_kernel, dict(BLOCK_N=16, BLOCK_D=32), 8)):
        consts = {k: v for k, v in {**SWITCHES, **tiles}.items() if k in fn.arg_names}
        sig = {k: "constexpr" if k in consts else TYPES[k] for k in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32),
                                options=dict(num_warps=warps))
        assert kernel.asm["cubin"], (cap, fn.__name__)
print("compiled")
"""


@pytest.fixture(scope="module")
def without_interpreter():
    """WITHOUT_INTERPRETER's output from a fresh process with no TRITON_INTERPRET (one process
    for both tests below: starting torch + triton costs seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", WITHOUT_INTERPRETER], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_cpu_needs_the_interpreter(without_interpreter):
    """Without TRITON_INTERPRET=1 at import time, CPU is unavailable and the reason says how to fix it."""
    lines = without_interpreter.stdout.splitlines()
    assert len(lines) >= 3, without_interpreter.stderr[-3000:]
    first, second, third = lines[:3]
    assert first.startswith("False") and "set the environment variable TRITON_INTERPRET=1" in first
    assert second.startswith("False") and "was set after" in second
    assert third == "False"


def test_kernels_compile_for_cuda_without_a_gpu(without_interpreter):
    """Compiled (non-interpreted) Triton accepts the kernels: builds cubins for sm_80 and sm_90."""
    out = without_interpreter
    if out.returncode and any(m in out.stderr for m in ("Cannot find ptxas", "ImportError:",
                                                         "ModuleNotFoundError:")):
        pytest.skip(f"no offline CUDA toolchain in this triton install: {out.stderr[-300:]}")
    assert out.returncode == 0 and out.stdout.endswith("compiled\n"), out.stderr[-3000:]
