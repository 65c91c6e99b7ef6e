"""The native (csrc/ C++) backend on CPU against the torch backend and the float64 reference.

tests/test_ops.py runs the shared oracle suite over every backend; these are native-specific:
every variant x activation against its semantic twin (the torch backend) to fp32 rounding, the
dropout mask bit for bit, storage/weight dtype mixes, determinism, the Philox of reft_rows.h
against family.philox_randint, and the availability reporting.
"""
import shutil
import subprocess

import pytest
import torch

from reft_kernels.ops import VARIANTS, reft_edit
from reft_kernels.ops import native_backend as nb
from reft_kernels.ops.variants import canonical_rows, dropout_keep_mask, philox_randint
from reft_kernels.ops.reference import reft_edit_reference

CPU = torch.device("cpu")
_no_tools = nb._missing_tools("cpu")
pytestmark = pytest.mark.skipif(_no_tools is not None and "compiler" in _no_tools,
                                reason=f"native backend cannot be built here: {_no_tools}")

ACTS = ["linear", "relu", "gelu", "silu", "tanh", "sigmoid"]
CASES = [(v, a) for v in sorted(VARIANTS) for a in (ACTS if VARIANTS[v].has_weight else [None])]
B, T, D, R = 3, 17, 123, 4


def positions_with_pads_and_dups(gen):
    """Rows with 5, 4, 4 distinct positions (N = 13, prime), duplicates and -1 pads."""
    rows = []
    for n in (5, 4, 4):
        pos = torch.randperm(T, generator=gen)[:n].tolist()
        rows.append(pos + pos[:2] + [-1] * (9 - n))
    return torch.tensor(rows)[:, torch.randperm(11, generator=gen)]


def make_params(variant, wdtype, gen, r=R, d=D):
    spec = VARIANTS[variant]
    proj = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].t()
    weight = torch.randn(r, d, generator=gen, dtype=torch.float64) / d ** 0.5 if spec.has_weight else None
    bias = torch.randn(r, generator=gen, dtype=torch.float64)
    proj_bias = torch.randn(r, generator=gen, dtype=torch.float64) if variant == "noreft" else None
    cast = lambda t: None if t is None else t.to(wdtype).contiguous()  # noqa: E731
    return [proj.float().contiguous(), cast(weight), cast(bias), cast(proj_bias)]


def run(fn, hidden, positions, params, grad_out, **kw):
    """[out, grad_hidden, grads of the non-None params] for one call of fn."""
    h = hidden.detach().clone().requires_grad_(True)
    ps = [None if p is None else p.detach().clone().requires_grad_(True) for p in params]
    out = fn(h * 1 if kw.get("inplace") else h, positions, *ps, **kw)
    wrt = [h] + [p for p in ps if p is not None]
    return [out.detach()] + list(torch.autograd.grad(out, wrt, grad_out.to(out.dtype)))


def both(variant, hdtype=torch.float32, wdtype=torch.float32, act=None, dropout=0.0,
         inplace=False, seed=77, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    positions = positions_with_pads_and_dups(gen)
    hidden = torch.randn(B, T, D, generator=gen).to(hdtype)
    params = make_params(variant, wdtype, gen)
    grad_out = torch.randn(B, T, D, generator=gen)
    kw = dict(variant=variant, act=act, dropout=dropout, seed=seed, inplace=inplace)
    ours = run(reft_edit, hidden, positions, params, grad_out, backend="native", **kw)
    twin = run(reft_edit, hidden, positions, params, grad_out, backend="torch", **kw)
    return positions, hidden, params, grad_out, ours, twin


def assert_close(ours, twin, rtol, atol, what=""):
    for i, (x, y) in enumerate(zip(ours, twin)):
        assert x.dtype == y.dtype and x.shape == y.shape, (what, i, x.dtype, y.dtype)
        scale = max(1.0, y.double().abs().max().item())
        err = (x.double() - y.double()).abs().max().item()
        assert err <= atol * scale, f"{what} tensor {i}: max error {err:.3e} > {atol * scale:.1e}"


def test_builds_and_is_available():
    assert nb.is_available(CPU), nb.unavailable_reason(CPU)
    assert nb.unavailable_reason(CPU) == "available"


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("variant,act", CASES)
def test_matches_torch_backend_and_reference(variant, act, inplace):
    dropout = 0.0 if variant == "consreft" else 0.25
    positions, hidden, params, grad_out, ours, twin = both(variant, act=act, dropout=dropout,
                                                          inplace=inplace)
    assert_close(ours, twin, 0, 2e-6, f"{variant}/{act}")
    # and against the float64 oracle (autograd through the reference formula)
    p64 = [None if p is None else p.double() for p in params]
    oracle = run(reft_edit_reference, hidden.double(), positions, p64, grad_out.double(),
                 variant=variant, act=act, dropout=dropout, seed=77, inplace=inplace)
    assert_close([o.double() for o in ours], oracle, 0, 2e-5, f"{variant}/{act} vs oracle")


@pytest.mark.parametrize("variant", ["loreft", "nodireft", "lobireft"])
def test_dropout_mask_equals_torch_backend(variant):
    positions, hidden, _, grad_out, ours, twin = both(variant, act="relu", dropout=0.5, seed=2**40 + 3)
    rows = canonical_rows(positions, T)
    rows = rows[rows >= 0]
    keep = dropout_keep_mask(2**40 + 3, rows, D, 0.5)
    assert 0.35 < keep.float().mean().item() < 0.65
    for out, g in ((ours[0], ours[1]), (twin[0], twin[1])):
        assert torch.equal(out.view(-1, D)[rows] == 0, ~keep)   # forward mask
        if variant == "lobireft":  # grad_h = g' = g * keep / (1 - p): the backward's mask
            assert torch.equal(g.view(-1, D)[rows] == 0, ~keep)


@pytest.mark.parametrize("hdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["loreft", "noreft", "lobireft"])
def test_storage_and_weight_dtypes(hdtype, wdtype, variant):
    _, _, params, _, ours, twin = both(variant, hdtype, wdtype, act="silu",
                                       dropout=0.0 if variant == "consreft" else 0.1)
    eps = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[hdtype]
    assert ours[0].dtype == hdtype and ours[1].dtype == hdtype
    assert [g.dtype for g in ours[2:]] == [p.dtype for p in params if p is not None]
    assert_close(ours[:2], twin[:2], 0, eps, "out/grad_h")  # at most ~1 ulp of the storage dtype
    weps = 2e-6 if wdtype == torch.float32 else 8e-3
    assert_close(ours[2:], twin[2:], 0, weps, "weight grads")
    assert torch.equal(ours[0] == 0, twin[0] == 0)  # the same elements are dropped


def test_float64_matches_reference_tightly():
    gen = torch.Generator().manual_seed(3)
    positions = positions_with_pads_and_dups(gen)
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    params = [None if p is None else p.double() for p in make_params("noreft", torch.float64, gen)]
    grad_out = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    kw = dict(variant="noreft", act="gelu", dropout=0.3, seed=5)
    ours = run(reft_edit, hidden, positions, params, grad_out, backend="native", **kw)
    oracle = run(reft_edit_reference, hidden, positions, params, grad_out, **kw)
    assert all(o.dtype == torch.float64 for o in ours)
    assert_close(ours, oracle, 0, 1e-12, "fp64")


def test_deterministic_and_thread_count_independent_within_rounding():
    first = both("loreft", act="tanh", dropout=0.1)[4]
    again = both("loreft", act="tanh", dropout=0.1)[4]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # bitwise, run to run
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = both("loreft", act="tanh", dropout=0.1)[4]
    finally:
        torch.set_num_threads(threads)
    assert_close(single, first, 0, 2e-6, "1 thread vs default")


def test_rank_one_and_odd_rank():
    for r in (1, 9):
        gen = torch.Generator().manual_seed(r)
        positions = positions_with_pads_and_dups(gen)
        hidden = torch.randn(B, T, D, generator=gen)
        params = make_params("loreft", torch.float32, gen, r=r)
        grad_out = torch.randn(B, T, D, generator=gen)
        ours = run(reft_edit, hidden, positions, params, grad_out, backend="native", act="gelu")
        twin = run(reft_edit, hidden, positions, params, grad_out, backend="torch", act="gelu")
        assert_close(ours, twin, 0, 2e-6, f"r={r}")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_header_philox_matches_family(tmp_path):
    """reft_rows.h's Philox (used by both kernels) equals family.philox_randint (= tl.randint)."""
    seeds = [0, 1, 77, 2**32 + 5, 2**62 - 1]
    offsets = [0, 1, 123, 2**31 + 7, 2**32 - 1, 2**32, 3 * 2**32 + 11, 2**45 + 99]
    src = tmp_path / "philox.cpp"
    src.write_text('#include <cstdio>\n#include "reft_rows.h"\nint main() {\n'
                   + "".join(f"  printf(\"%u\\n\", reft::philox_randint({s}ull, {o}ull));\n"
                             for s in seeds for o in offsets)
                   + "  return 0;\n}\n")
    exe = tmp_path / "philox"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{nb.CSRC}", str(src), "-o", str(exe)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    want = [int(v) for s in seeds for v in philox_randint(s, torch.tensor(offsets, dtype=torch.int64))]
    assert got == want


def test_unavailable_reason_when_csrc_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(nb, "CSRC", tmp_path / "nowhere")
    monkeypatch.setattr(nb, "_modules", {})
    monkeypatch.setattr(nb, "_errors", {})
    assert not nb.is_available(CPU)
    assert "csrc/ not found" in nb.unavailable_reason(CPU)
    with pytest.raises(RuntimeError, match="csrc/ not found"):
        reft_edit(torch.randn(1, 2, 4), torch.tensor([[0]]), torch.randn(1, 4), torch.randn(1, 4),
                  torch.randn(1), backend="native")


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    bad = tmp_path / "csrc"
    bad.mkdir()
    for name in nb._SOURCES["cpu"] + nb._HEADERS["cpu"]:
        (bad / name).write_text((nb.CSRC / name).read_text())
    (bad / "reft_cpu.cpp").write_text("this is not C++;\n")  # fails before any torch header
    monkeypatch.setattr(nb, "CSRC", bad)
    monkeypatch.setattr(nb, "_modules", {})
    monkeypatch.setattr(nb, "_errors", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert not nb.is_available(CPU)
    assert nb.unavailable_reason(CPU).startswith("build failed")


@pytest.mark.parametrize("variant", ["loreft", "noreft", "direft", "lobireft"])
def test_gradcheck_float64(variant):
    gen = torch.Generator().manual_seed(11)
    positions = torch.tensor([[0, 3, 3, -1], [4, 1, -1, -1]])
    hidden = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [None if p is None else p.double().requires_grad_(True)
              for p in make_params(variant, torch.float64, gen, r=3, d=7)]
    act = "silu" if VARIANTS[variant].has_weight else None

    def fn(h, *ps):
        it = iter(ps)
        full = [next(it) if q is not None else None for q in params]
        return reft_edit(h * 1.0, positions, *full, variant=variant, act=act, dropout=0.3, seed=11,
                         backend="native", inplace=True)

    assert torch.autograd.gradcheck(fn, (hidden, *[q for q in params if q is not None]))


def test_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(0)
    R, W, b, _ = make_params("loreft", torch.float32, gen, r=4, d=32)
    hidden = torch.randn(2, 6, 32, generator=gen)
    positions = torch.tensor([[0, 5], [1, -1]])

    def step(h, R, W, b):
        return reft_edit(h, positions, R, W, b, backend="native", dropout=0.1, seed=4).square().sum()

    ps = [p.clone().requires_grad_(True) for p in (R, W, b)]
    grads = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, *ps), ps)
    ref = [p.clone().requires_grad_(True) for p in (R, W, b)]
    for g, rg in zip(grads, torch.autograd.grad(step(hidden, *ref), ref)):
        torch.testing.assert_close(g, rg)


def test_baseline_isa_path_matches_torch_backend():
    """The row loops are also compiled without AVX2 (for older CPUs); check that build in a subprocess."""
    code = (
        "import torch\n"
        "from reft_kernels.ops import reft_edit\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(2, 9, 37, generator=g); pos = torch.tensor([[0, 3, 3, -1], [8, 1, 2, -1]])\n"
        "R, W, b, c = torch.randn(3, 37, generator=g), torch.randn(3, 37, generator=g), torch.randn(3), torch.randn(3)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    outs = []\n"
        "    for be in ('torch', 'native'):\n"
        "        hh = h.to(dt).requires_grad_(); ps = [t.clone().requires_grad_() for t in (R, W, b, c)]\n"
        "        o = reft_edit(hh, pos, *ps, variant='noreft', act='gelu', dropout=0.2, seed=3, backend=be)\n"
        "        outs.append([o] + list(torch.autograd.grad(o, [hh] + ps, torch.ones_like(o))))\n"
        "    for x, y in zip(*outs):\n"
        "        tol = 1e-5 if x.dtype == torch.float32 else 2e-2\n"
        "        assert (x.float() - y.float()).abs().max() <= tol * max(1.0, y.float().abs().max().item()), (dt, x, y)\n"
        "print('ok')\n")
    import os
    import sys
    env = dict(os.environ, REFT_KERNELS_NO_AVX2="1")
    root = str(nb.CSRC.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
