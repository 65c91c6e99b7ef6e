"""Device helpers and launch constants shared by the Triton kernels of the op family.

``triton_backend``'s kernels build on these: the activations and their derivatives (ids of
``variants.ACT_IDS``), the Philox dropout factor (bit-identical to
``variants.dropout_keep_mask``), the column helpers of the (BLOCK_N, R_PAD) tiles, and the row
kernels' tile choice. See :mod:`reft_kernels.ops.triton_backend` for the kernel design.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # keep the module importable so that is_available() can say why
    triton = tl = None
    IMPORT_ERROR = f"triton is not importable ({exc}); install it with `pip install triton`"
else:
    IMPORT_ERROR = None

__all__ = ["triton", "tl", "IMPORT_ERROR", "COLS_BLOCK_N", "MAX_RANK", "TARGET_PROGRAMS",
           "MIN_SPLIT_TILES", "row_tiles"]

COLS_BLOCK_N = 16        # rows per tile of the backward column kernel (tl.dot needs >= 16)
MAX_RANK = 256           # larger r would spill the column kernel's (R_PAD, BLOCK_D) accumulators
TARGET_PROGRAMS = 256    # grids grow (smaller row tiles, more row splits) to about this many
MIN_SPLIT_TILES = 4      # row tiles per split at least (tests lower it to exercise splitting)
# (the launchers read TARGET_PROGRAMS and MIN_SPLIT_TILES from this module at call time: patch
# them here, e.g. monkeypatch.setattr(triton_common, "TARGET_PROGRAMS", 8))


def _jit(**options):
    """triton.jit, or a no-op without triton (the module stays importable to report why)."""
    return triton.jit(**options) if triton is not None else (lambda fn: fn)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@_jit()
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@_jit()
def _activation(z, ACT: tl.constexpr):
    """ACT ids of family.ACT_IDS: 0 linear, 1 relu, 2 gelu (erf), 3 silu, 4 tanh, 5 sigmoid."""
    if ACT == 1:
        y = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        y = _tanh(z)
    elif ACT == 5:
        y = 1.0 / (1.0 + tl.exp(-z))
    else:
        y = z
    return y


@_jit()
def _activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for ACT ids 1..5 (linear is handled by the caller)."""
    if ACT == 1:
        y = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        y = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        sg = 1.0 / (1.0 + tl.exp(-z))
        y = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 4:
        t = _tanh(z)
        y = 1.0 - t * t
    else:
        sg = 1.0 / (1.0 + tl.exp(-z))
        y = sg * (1.0 - sg)
    return y


@_jit()
def _dropout_scale(seed, rows, cols, d, threshold, scale):
    """(rows x cols) factor m / (1 - p): keep iff (philox(seed, row * d + col) >> 8) >= threshold."""
    offsets = rows[:, None] * d + cols[None, :]          # int64, as family.dropout_keep_mask
    bits = (tl.randint(seed, offsets) >> 8).to(tl.int32)  # 24 high bits of a uint32
    return tl.where(bits >= threshold, scale, 0.0)


@_jit()
def _as_compute_dtype(scale, ACC: tl.constexpr):
    """The fp64 ``scale`` argument in the compute dtype (in the interpreter it arrives as a float)."""
    return (tl.full((), 0.0, ACC) + scale).to(ACC)


@_jit()
def _column(tile, ks, k):
    """Column k of a (BLOCK_N, R_PAD) tile."""
    return tl.sum(tl.where(ks[None, :] == k, tile, 0.0), axis=1)


@_jit()
def _add_column(tile, ks, k, col):
    """``tile`` with ``col`` (BLOCK_N,) added to its column k."""
    return tile + tl.where(ks[None, :] == k, col[:, None], 0.0)



def row_tiles(N, d):
    """Grid and tile of the row kernels: 2 rows per program while N is small (parallelism), up
    to 8 when N is large (fewer L2 re-reads of P and W); chunks of about 1024 elements."""
    block_n = min(8, max(2, triton.next_power_of_2(triton.cdiv(N, TARGET_PROGRAMS))))
    block_d = max(16, min(512, 1024 // block_n, triton.next_power_of_2(d)))
    return (triton.cdiv(N, block_n),), dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
