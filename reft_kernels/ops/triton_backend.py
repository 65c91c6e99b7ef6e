"""The ``triton`` backend: fused Triton kernels for the whole ReFT op.

Implements the backend contract of :mod:`reft_kernels.ops.autograd` (``forward_rows``,
``backward_rows``, per-row adapters: proj/weight (A, r, d), bias/proj_bias (A, r), entry n reads
slice ``adapter[n]``; one adapter is A = 1) for all six variants with ONE parametrised kernel
family; the variant, the
activation, NoReFT's projection bias and dropout are ``tl.constexpr`` switches. The math is the
one of :mod:`reft_kernels.ops.variants`, with z = W h + b (z = b without W, where act is linear):

    forward   s = act(z) - [C](P h + c),   out = dropout(h + P^T s)
    backward  g' = g * m / (1-p),  u = P g',  v = u * act'(z)          (v = u without W)
              grad_h = g' + [W] W^T v - [C] P^T u
              grad_P = sum_rows s g'^T - [C] u h^T,  grad_W = sum_rows v h^T,
              grad_b = sum_rows v,  grad_c = -sum_rows u

Kernel design. d is walked in BLOCK_D chunks with masks (any d works); r-vectors live in
(BLOCK_N, R_PAD) register tiles, R_PAD = max(16, next_pow2(r)) (16: the tl.dot minimum).

* ``_forward_kernel``, grid (cdiv(N, BLOCK_N),), one launch for the whole (mixed) batch. Pass 1
  over d loads each row chunk once, stores it to ``saved`` and reduces it against each rank row
  of its adapter's W and P, loaded as a (BLOCK_N, BLOCK_D) gather since the rows of a tile may
  use different adapters (a runtime loop over the r ranks: no padding work, no recompile per r); pass 2 reloads the chunk (an L2 hit), adds
  P^T s rank by rank, applies the dropout mask and writes the row back in x2d's dtype. HBM
  traffic per selected row: one read, one write and the saved copy. BLOCK_N is 2 rows while N
  is small, so a few hundred rows already make a few hundred programs, and grows to 8 for large
  N to cut the L2 re-reads of P and W; chunks hold ~1024 elements (offline ptxas for sm_90 and
  sm_80: no register spills beyond a few bytes in any kernel, r <= 64 checked).
* ``_backward_rows_kernel``, same grid and tiling: one pass over d computes z, P h and u per row
  and stores the per-row r-vectors s, u, v (a (3, N, R_PAD) scratch; zero for rows = -1).
* ``_backward_cols_kernel``, grid (cdiv(d, BLOCK_D), A * K): the entries ordered by adapter
  (:func:`~reft_kernels.ops.variants.adapter_segments`, a stable sort, no host sync; no sort
  for A = 1); program (c, a * K + k) owns column chunk c of the k-th of K equal parts of
  adapter a's entries, walks them IN ORDER in 16-row tiles, rewrites grad2d[rows, chunk] with
  grad_h and accumulates grad_P, grad_W (R_PAD x BLOCK_D, ``tl.dot`` with K = 16 rows) and
  grad_b, grad_c of adapter a in registers, then stores them to an (A, K, r, d) partial buffer
  that ``torch.sum`` reduces over K in a fixed order. A part holds >= max(64, 2 * R_PAD) rows
  on average, so the partials never outweigh the rows they summarise; K grows only until about
  256 programs run.

Determinism: there are no atomics anywhere, so every result is bit-reproducible run to run for a
given shape and device. This is the only (and default) mode, so
``torch.are_deterministic_algorithms_enabled()`` / ``REFT_KERNELS_DETERMINISTIC=1`` need no
special path: an atomic reduction would only save the final small ``(A, K, r, d)`` sum.

Precision: everything accumulates in fp32 (x2d, P, W, b, c are each loaded in their own dtype
and upcast); products are fp32 FMAs (``tl.dot(input_precision="ieee")``: no tf32). float64
inputs compute in float64 (for oracle comparisons and gradcheck; slow on most GPUs, not tuned).
tanh is evaluated as (1 - e) / (1 + e), e = exp(-2|z|): absolute error ~1 ulp of 1.0.
Limits: r <= 256 (register tiles; tuned for the small ranks ReFT uses). N is not specialised,
so a new number of edited rows never recompiles (only BLOCK_N's three sizes exist).

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is imported); :func:`is_available` / :func:`unavailable_reason` report that condition.
"""
from __future__ import annotations

import os

import torch

from . import triton_common
from .triton_common import (  # noqa: F401 - re-exported: tests refer to them here
    COLS_BLOCK_N, MAX_RANK, _activation, _activation_grad, _add_column, _as_compute_dtype, _column,
    _dropout_scale, _jit, row_tiles, tl, triton)
from .variants import ACT_IDS, adapter_segments, compute_dtype, dropout_threshold

_IMPORT_ERROR = triton_common.IMPORT_ERROR

__all__ = ["forward_rows", "backward_rows", "is_available", "unavailable_reason"]


@_jit()
def _load_slices(ptr, a_off, k, stride_r, stride_d, cols, m2, ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_D): rank row k of each entry's adapter slice (a_off: its element offset)."""
    return tl.load(ptr + a_off[:, None] + k * stride_r + cols[None, :] * stride_d, mask=m2,
                   other=0.0).to(ACC)


@_jit()
def _tile_sources(src_ptr, rows, live, a, saved_ptr, idx, in_range, p_ptr, stride_pa, stride_p0,
                  stride_p1, w_ptr, stride_wa, stride_w0, stride_w1, b_ptr, stride_ba, c_ptr,
                  stride_ca, seed, threshold, scale, r, d, ACT: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, SUBTRACT_PROJ: tl.constexpr,
                  HAS_PROJ_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FORWARD: tl.constexpr,
                  ACC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One pass over d for a tile of entries: z = W h + b, s = act(z) - [C](P h + c), u = P g',
    each entry with its adapter ``a``'s slice of the weights.

    FORWARD: h = src[rows] (x2d), copied to ``saved`` (zeros for rows = -1); u stays 0.
    Backward: h = saved[idx] (read only when W or C needs it), g' = src[rows] (grad2d) * dropout.
    """
    ks = tl.arange(0, R_PAD)
    zw = tl.zeros((BLOCK_N, R_PAD), ACC)
    zp = tl.zeros((BLOCK_N, R_PAD), ACC)
    u = tl.zeros((BLOCK_N, R_PAD), ACC)
    p_off, w_off = a * stride_pa, a * stride_wa
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = live[:, None] & (cols[None, :] < d)
        src = tl.load(src_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0)
        if FORWARD:
            tl.store(saved_ptr + idx[:, None] * d + cols[None, :], src,
                     mask=in_range[:, None] & (cols[None, :] < d))
            h = src.to(ACC)
        else:
            g = src.to(ACC)
            if HAS_DROPOUT:
                g *= _dropout_scale(seed, rows, cols, d, threshold, scale)
            if HAS_WEIGHT or SUBTRACT_PROJ:
                h = tl.load(saved_ptr + idx[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        for k in range(r):                            # per-rank reductions over the chunk
            if SUBTRACT_PROJ or not FORWARD:
                pk = _load_slices(p_ptr, p_off, k, stride_p0, stride_p1, cols, m2, ACC)
            if SUBTRACT_PROJ:
                zp = _add_column(zp, ks, k, tl.sum(h * pk, axis=1))
            if HAS_WEIGHT:
                wk = _load_slices(w_ptr, w_off, k, stride_w0, stride_w1, cols, m2, ACC)
                zw = _add_column(zw, ks, k, tl.sum(h * wk, axis=1))
            if not FORWARD:
                u = _add_column(u, ks, k, tl.sum(g * pk, axis=1))
    mr = live[:, None] & (ks[None, :] < r)
    z = zw + tl.load(b_ptr + a[:, None] * stride_ba + ks[None, :], mask=mr, other=0.0).to(ACC)
    s = _activation(z, ACT)
    if SUBTRACT_PROJ:
        s -= zp
        if HAS_PROJ_BIAS:
            s -= tl.load(c_ptr + a[:, None] * stride_ca + ks[None, :], mask=mr, other=0.0).to(ACC)
    return z, s, u


@_jit()
def _tile_entries(rows_ptr, ad_ptr, n_rows, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N entries: index, in range, flat row (-1 = skip), adapter, live."""
    idx = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = idx < n_rows
    rows = tl.load(rows_ptr + idx, mask=in_range, other=-1).to(tl.int64)
    a = tl.load(ad_ptr + idx, mask=in_range, other=0).to(tl.int64)
    return idx.to(tl.int64), in_range, rows, a, rows >= 0


@_jit(do_not_specialize=["n_rows", "seed"])
def _forward_kernel(x_ptr, rows_ptr, ad_ptr, saved_ptr, p_ptr, w_ptr, b_ptr, c_ptr, n_rows, d, r,
                    stride_pa, stride_p0, stride_p1, stride_wa, stride_w0, stride_w1, stride_ba,
                    stride_ca, seed: tl.int64, threshold, scale: tl.float64, ACT: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, SUBTRACT_PROJ: tl.constexpr,
                    HAS_PROJ_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr,
                    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    idx, in_range, rows, a, live = _tile_entries(rows_ptr, ad_ptr, n_rows, BLOCK_N)
    scale = _as_compute_dtype(scale, ACC)
    _, s, _ = _tile_sources(x_ptr, rows, live, a, saved_ptr, idx, in_range, p_ptr, stride_pa,
                            stride_p0, stride_p1, w_ptr, stride_wa, stride_w0, stride_w1, b_ptr,
                            stride_ba, c_ptr, stride_ca, seed, threshold, scale, r, d, ACT,
                            HAS_WEIGHT, SUBTRACT_PROJ, HAS_PROJ_BIAS, HAS_DROPOUT, True, ACC, R_PAD,
                            BLOCK_N, BLOCK_D)
    ks = tl.arange(0, R_PAD)
    p_off = a * stride_pa
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = live[:, None] & (cols[None, :] < d)
        ptrs = x_ptr + rows[:, None] * d + cols[None, :]
        h = tl.load(ptrs, mask=m2, other=0.0)
        out = h.to(ACC)
        for k in range(r):
            pk = _load_slices(p_ptr, p_off, k, stride_p0, stride_p1, cols, m2, ACC)
            out += _column(s, ks, k)[:, None] * pk
        if HAS_DROPOUT:
            out *= _dropout_scale(seed, rows, cols, d, threshold, scale)
        tl.store(ptrs, out.to(h.dtype), mask=m2)


@_jit(do_not_specialize=["n_rows", "seed"])
def _backward_rows_kernel(g_ptr, rows_ptr, ad_ptr, saved_ptr, p_ptr, w_ptr, b_ptr, c_ptr, s_ptr,
                          u_ptr, v_ptr, n_rows, d, r, stride_pa, stride_p0, stride_p1, stride_wa,
                          stride_w0, stride_w1, stride_ba, stride_ca, seed: tl.int64, threshold,
                          scale: tl.float64, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          SUBTRACT_PROJ: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    idx, in_range, rows, a, live = _tile_entries(rows_ptr, ad_ptr, n_rows, BLOCK_N)
    scale = _as_compute_dtype(scale, ACC)
    z, s, u = _tile_sources(g_ptr, rows, live, a, saved_ptr, idx, in_range, p_ptr, stride_pa,
                            stride_p0, stride_p1, w_ptr, stride_wa, stride_w0, stride_w1, b_ptr,
                            stride_ba, c_ptr, stride_ca, seed, threshold, scale, r, d, ACT,
                            HAS_WEIGHT, SUBTRACT_PROJ, HAS_PROJ_BIAS, HAS_DROPOUT, False, ACC,
                            R_PAD, BLOCK_N, BLOCK_D)
    if ACT == 0:
        v = u
    else:
        v = u * _activation_grad(z, ACT)
    ks = tl.arange(0, R_PAD)
    keep = live[:, None] & (ks[None, :] < r)
    offs = idx[:, None] * R_PAD + ks[None, :]
    tl.store(s_ptr + offs, tl.where(keep, s, 0.0), mask=in_range[:, None])
    tl.store(u_ptr + offs, tl.where(keep, u, 0.0), mask=in_range[:, None])
    tl.store(v_ptr + offs, tl.where(keep, v, 0.0), mask=in_range[:, None])


@_jit(do_not_specialize=["n_parts", "seed"])
def _backward_cols_kernel(g_ptr, rows_ptr, order_ptr, starts_ptr, saved_ptr, p_ptr, w_ptr, s_ptr,
                          u_ptr, v_ptr, gp_ptr, gw_ptr, gb_ptr, gc_ptr, n_parts, d, r, stride_pa,
                          stride_p0, stride_p1, stride_wa, stride_w0, stride_w1, seed: tl.int64,
                          threshold, scale: tl.float64, HAS_WEIGHT: tl.constexpr,
                          SUBTRACT_PROJ: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d, pid = tl.program_id(0), tl.program_id(1)
    a = pid // n_parts
    part = pid % n_parts
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    ks = tl.arange(0, R_PAD)
    scale = _as_compute_dtype(scale, ACC)
    wmask = (ks[:, None] < r) & cmask[None, :]
    wofs = ks[:, None] * stride_p0 + cols[None, :] * stride_p1
    if SUBTRACT_PROJ:
        pc = tl.load(p_ptr + a.to(tl.int64) * stride_pa + wofs, mask=wmask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        wc = tl.load(w_ptr + a.to(tl.int64) * stride_wa + ks[:, None] * stride_w0
                     + cols[None, :] * stride_w1, mask=wmask, other=0.0).to(ACC)
    acc_p = tl.zeros((R_PAD, BLOCK_D), ACC)
    acc_w = tl.zeros((R_PAD, BLOCK_D), ACC)
    acc_b = tl.zeros((R_PAD,), ACC)
    acc_c = tl.zeros((R_PAD,), ACC)
    seg0 = tl.load(starts_ptr + a)
    seg1 = tl.load(starts_ptr + a + 1)
    per = (seg1 - seg0 + n_parts - 1) // n_parts
    start = seg0 + part * per
    end = tl.minimum(start + per, seg1)
    for n0 in range(start, end, BLOCK_N):          # in order: deterministic sums
        m = n0 + tl.arange(0, BLOCK_N)
        in_range = m < end
        idx = tl.load(order_ptr + m, mask=in_range, other=0).to(tl.int64)
        rows = tl.load(rows_ptr + idx, mask=in_range, other=-1).to(tl.int64)
        live = rows >= 0
        offs = idx[:, None] * R_PAD + ks[None, :]
        s = tl.load(s_ptr + offs, mask=in_range[:, None], other=0.0)
        u = tl.load(u_ptr + offs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=in_range[:, None], other=0.0)
        m2 = live[:, None] & cmask[None, :]
        g_ptrs = g_ptr + rows[:, None] * d + cols[None, :]
        g_raw = tl.load(g_ptrs, mask=m2, other=0.0)
        g = g_raw.to(ACC)
        if HAS_DROPOUT:
            g *= _dropout_scale(seed, rows, cols, d, threshold, scale)
        grad_h = g
        acc_p += tl.dot(tl.trans(s), g, input_precision="ieee")
        if HAS_WEIGHT or SUBTRACT_PROJ:
            h = tl.load(saved_ptr + idx[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_WEIGHT:
            grad_h += tl.dot(v, wc, input_precision="ieee")
            acc_w += tl.dot(tl.trans(v), h, input_precision="ieee")
        if SUBTRACT_PROJ:
            grad_h -= tl.dot(u, pc, input_precision="ieee")
            acc_p -= tl.dot(tl.trans(u), h, input_precision="ieee")
        tl.store(g_ptrs, grad_h.to(g_raw.dtype), mask=m2)
        acc_b += tl.sum(v, axis=0)
        acc_c -= tl.sum(u, axis=0)
    out = pid.to(tl.int64) * r * d + ks[:, None] * d + cols[None, :]
    omask = (ks[:, None] < r) & cmask[None, :]
    tl.store(gp_ptr + out, acc_p, mask=omask)
    if HAS_WEIGHT:
        tl.store(gw_ptr + out, acc_w, mask=omask)
    if pid_d == 0:
        tl.store(gb_ptr + pid * r + ks, acc_b, mask=ks < r)
        if HAS_PROJ_BIAS:
            tl.store(gc_ptr + pid * r + ks, acc_c, mask=ks < r)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _launch_config(x, proj, weight, bias, proj_bias, spec, act, p, seed):
    A, r, d = proj.shape
    if r > MAX_RANK:
        raise ValueError(f"rank r={r} is above the triton backend's limit of {MAX_RANK};"
                         " use backend='torch' for larger ranks")
    w_strides = weight.stride() if weight is not None else (0, 0, 0)
    bias = bias.contiguous()
    proj_bias = proj_bias.contiguous() if proj_bias is not None else None
    runtime = dict(d=d, r=r, stride_pa=proj.stride(0), stride_p0=proj.stride(1),
                   stride_p1=proj.stride(2), stride_wa=w_strides[0], stride_w0=w_strides[1],
                   stride_w1=w_strides[2], seed=int(seed), threshold=dropout_threshold(p),
                   scale=1.0 / (1.0 - p))
    switches = dict(HAS_WEIGHT=spec.has_weight, SUBTRACT_PROJ=spec.subtract_proj,
                    HAS_PROJ_BIAS=proj_bias is not None, HAS_DROPOUT=p > 0,
                    ACC=tl.float64 if compute_dtype(x) == torch.float64 else tl.float32,
                    R_PAD=max(16, triton.next_power_of_2(r)))
    act_id = ACT_IDS[act] if spec.has_weight else 0
    return runtime, switches, act_id, bias, proj_bias


def _bias_strides(bias, proj_bias):
    return dict(stride_ba=bias.stride(0), stride_ca=proj_bias.stride(0) if proj_bias is not None else 0)


def forward_rows(x2d, rows, adapter, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``x2d`` in place at ``rows`` (entry n with adapter ``adapter[n]``); return saved rows."""
    N, d = rows.numel(), x2d.shape[1]
    saved = x2d.new_empty((N, d))
    if N == 0:
        return saved
    runtime, switches, act_id, bias, proj_bias = _launch_config(x2d, proj, weight, bias, proj_bias,
                                                                spec, act, p, seed)
    grid, tiles = row_tiles(N, d)
    _forward_kernel[grid](x2d, rows, adapter, saved, proj, weight, bias, proj_bias, n_rows=N,
                                **runtime, **_bias_strides(bias, proj_bias), ACT=act_id,
                                **switches, **tiles)
    return saved


def backward_rows(grad2d, rows, adapter, saved, proj, weight, bias, proj_bias, spec, act, p, seed):
    """Edit ``grad2d`` in place at ``rows``; return the stacked (A, r, d) / (A, r) weight grads."""
    N, d = rows.numel(), grad2d.shape[1]
    A, r, _ = proj.shape
    cd = compute_dtype(grad2d)
    if N == 0:
        zeros = lambda *s: grad2d.new_zeros(s, dtype=cd)  # noqa: E731
        return (zeros(A, r, d), zeros(A, r, d) if spec.has_weight else None, zeros(A, r),
                zeros(A, r) if proj_bias is not None else None)
    runtime, switches, act_id, bias, proj_bias = _launch_config(grad2d, proj, weight, bias,
                                                                proj_bias, spec, act, p, seed)
    r_pad = switches["R_PAD"]
    # column kernel: (R_PAD x COLS_BLOCK_N) @ (COLS_BLOCK_N x block_d) tl.dot tiles; narrow
    # column chunks and 8 warps keep its fp32 FMA-dot operands in registers
    block_d = max(16, min(32 if r_pad == 16 else 16, triton.next_power_of_2(d)))
    d_blocks = triton.cdiv(d, block_d)
    # K parts per adapter: about TARGET_PROGRAMS programs, each part >= min_rows entries on average
    min_rows = max(triton_common.MIN_SPLIT_TILES * COLS_BLOCK_N, 2 * r_pad)
    n_parts = max(1, min(triton.cdiv(N, A * min_rows), triton_common.TARGET_PROGRAMS // (d_blocks * A)))
    if A * n_parts > 65535:
        raise ValueError(f"{A} stacked adapters exceed the triton column kernel's grid limit of"
                         " 65535; split the stack into groups of at most 65535 adapters")
    gp = grad2d.new_empty((A * n_parts, r, d), dtype=cd)
    gb = grad2d.new_empty((A * n_parts, r), dtype=cd)
    gw = grad2d.new_empty((A * n_parts, r, d), dtype=cd) if spec.has_weight else None
    gc = grad2d.new_empty((A * n_parts, r), dtype=cd) if proj_bias is not None else None
    suv = grad2d.new_empty((3, N, r_pad), dtype=cd)
    grid, tiles = row_tiles(N, d)
    _backward_rows_kernel[grid](grad2d, rows, adapter, saved, proj, weight, bias, proj_bias,
                                      suv[0], suv[1], suv[2], n_rows=N, **runtime,
                                      **_bias_strides(bias, proj_bias), ACT=act_id, **switches,
                                      **tiles)
    order, starts = adapter_segments(rows, adapter, A)
    _backward_cols_kernel[(d_blocks, A * n_parts)](
        grad2d, rows, order, starts, saved, proj, weight, suv[0], suv[1], suv[2], gp, gw, gb, gc,
        n_parts=n_parts, **runtime, **switches, BLOCK_N=COLS_BLOCK_N, BLOCK_D=block_d,
        num_warps=8, num_stages=1 if r_pad >= 64 else 3)
    reduce = lambda t: None if t is None else t.view(A, n_parts, *t.shape[1:]).sum(1)  # noqa: E731
    return reduce(gp), reduce(gw), reduce(gb), reduce(gc)


# --------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device) -> str:
    """Why :func:`is_available` is False for ``device`` ("" when it is available)."""
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return ""
    if device.type != "cpu":
        return f"the triton backend runs on CUDA (or on CPU in the Triton interpreter), not on {device.type}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("on CPU the Triton kernels run only in the Triton interpreter: set the environment"
                " variable TRITON_INTERPRET=1 before triton is imported (e.g. `TRITON_INTERPRET=1"
                " python ...`), or use backend='torch'")
    if not _interpreted():
        return ("TRITON_INTERPRET=1 was set after triton / reft_kernels.ops.triton_backend was"
                " imported; set it before the first import (e.g. `TRITON_INTERPRET=1 python ...`)")
    return ""


def is_available(device) -> bool:
    """CUDA: triton importable. CPU: only in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return unavailable_reason(device) == ""
