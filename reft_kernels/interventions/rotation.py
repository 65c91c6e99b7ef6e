"""The rotation R (r x d, orthonormal rows) of LoReFT, DiReFT, ConsReFT and LobiReFT.

Default parametrisation (``orthogonal_map="householder"``): pyreft's, without the d x d buffer
-------------------------------------------------------------------------------------------
pyreft wraps a (d, r) weight in ``torch.nn.utils.parametrizations.orthogonal`` (Householder map
with trivialisation). With ``original`` X (d, r) trainable and a fixed d x d ``base``:

    A   = tril(X, -1)                         Householder tails (strict lower triangle)
    tau = 2 / (1 + sum_i A_ij^2)              per column, as torch computes it
    Q   = householder_product(A, tau) * s     s = diag(X).int()  (-1 at init, no gradient)
    R^T = base @ Q                            base = QR completion of R_init with a randn draw

so at init (A = 0, s = -1) R^T = base[:, :r] = R_init. Only A trains: the diagonal gets no
gradient (the ``.int()`` cast), and weight decay on it turns -1 into -0.99 and ``.int()`` into 0,
i.e. R = 0. Here A is the parameter ``reflectors`` (d, r) (only its strict lower triangle is used;
the rest gets zero gradient and is ignored, so weight decay cannot break R) and s the buffer
``signs`` (r,). The optimiser therefore sees exactly pyreft's tensor, element for element.

``base`` enters the gradient: dL/dQ = base^T dL/dR^T, and Adam normalises each element of A
separately, so it is not invariant under a rotation of base's completion columns
``base[:, r:]``: two bases with the same ``base[:, :r]`` give different trajectories (checked in
tests/test_interventions.py). Two cases:

* an intervention we create ourselves keeps pyreft's own completion by default (the d x d
  buffer ``base`` built from the same randn draw as pyreft's, ``completion="pyreft"``): pyreft's
  exact path from the same seed, at pyreft's memory and checkpoint cost (d x d floats per
  rotation). Opt-in (``completion="compact"``, or ``pyreft_base=False``) it keeps base as r
  Householder reflectors of R_init, the
  buffer ``base_householder`` (d, r) in torch's non-trivialised form (strict lower triangle:
  reflector tails V; diagonal: signs t), i.e. ``base = H_1 ... H_r diag(t, 1, ..., 1)`` with
  ``H_j = I - tau_j v_j v_j^T``, ``v_j = e_j + V[:, j]``. It is applied to Q in the compact WY
  form (the "UT transform", Joffrain et al. 2006): with V1 = V + I[:, :r] and G = V1^T V1,

      H_1 ... H_r = I - V1 T V1^T,   T^{-1} = triu(G, 1) + diag(G) / 2

  so ``base @ Q = Y - V1 T^{-1}\\(V1^T Y)`` with Y = diag(t, 1) Q: O(d r^2), nothing d x d.
  ``base[:, :r] = R_init`` (to fp32 rounding); its completion is the deterministic one of the
  reflectors, whereas pyreft's is random, so from the same seed the trajectory is another one,
  and it generalises worse (issue 20; :mod:`reft_kernels.interventions.completions` has the numbers and the
  third, ``"hartley"``, completion). ``base_householder`` is kept with every completion.
* loaded from pyreft's full state (``parametrizations.weight.original`` and ``...0.base``), the
  d x d ``base`` is kept as the buffer ``base`` and applied as pyreft does (``base @ Q``), so
  training continues exactly on pyreft's path (to float noise). :meth:`OrthonormalRotation.rebase`
  drops it (R kept, future path changed).

Opt-in parametrisation (``orthogonal_map="cholesky_qr"``)
-------------------------------------------------------
A free fp32 ``basis`` (r, d) orthonormalised by Cholesky-QR in fp64:
``L = cholesky(basis basis^T)``, ``R = L^{-1} basis``. One r x r factorisation per access and a
scale-invariant map; it does not follow pyreft's trajectory (see benchmarks/bench_rotation.py
and docs/api.md for where it is faster). A numerically rank-deficient or zero basis (the
Cholesky factor's diagonal) raises instead of giving NaN or non-orthonormal rows.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .completions import COMPACT, HARTLEY, PYREFT, complete_columns, \
    hartley_factors, resolve_completion, seed_from_draw
from .householder import apply_householder_base, householder_columns, householder_form
from ..compat.pyreft.rotation import pyreft_completion, rotation_from_pyreft, rotation_to_pyreft

__all__ = ["OrthonormalRotation", "ORTHOGONAL_MAPS", "householder_columns", "householder_form",
           "apply_householder_base", "rotation_from_pyreft", "rotation_to_pyreft",
           "PYREFT_ORIGINAL", "PYREFT_BASE"]

HOUSEHOLDER, CHOLESKY_QR = "householder", "cholesky_qr"
ORTHOGONAL_MAPS = (HOUSEHOLDER, CHOLESKY_QR)
PYREFT_ORIGINAL = "parametrizations.weight.original"   # pyreft's keys under rotate_layer.
PYREFT_BASE = "parametrizations.weight.0.base"
_HOUSEHOLDER_STATE = ("reflectors", "signs", "base_householder", "base", "completion_seed")
_ORTHONORMAL_ATOL = 1e-4
_MIN_PIVOT_RATIO = 1e-5   # Cholesky diag ratio below which the basis counts as rank-deficient


def _orthonormal_error(R: torch.Tensor) -> float:
    R = R.detach().double()
    return (R @ R.mT - torch.eye(R.shape[0], dtype=R.dtype, device=R.device)).abs().max().item()


def _check_orthonormal(R: torch.Tensor, what: str) -> None:
    err = _orthonormal_error(R)
    if not err <= _ORTHONORMAL_ATOL:   # also catches NaN
        raise ValueError(f"{what} is not orthonormal (max |R R^T - I| = {err:.2e} > "
                         f"{_ORTHONORMAL_ATOL}; rank-deficient, zero or non-finite): pass a "
                         f"matrix with orthonormal rows (or columns for pyreft's (d, r) layout)")


def _base_is_orthogonal(base: torch.Tensor) -> bool:
    """Cheap randomised test of base^T base = I: O(d^2 k), the caller's RNG untouched."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(base.shape[0], 4, generator=gen, dtype=torch.float64).to(base.device)
    b = base.double()
    err = ((b.mT @ (b @ z)) - z).norm() / z.norm()
    return bool(err <= _ORTHONORMAL_ATOL)


_PARITY_DRAW = contextvars.ContextVar("reft_kernels_rng_parity_draw", default=True)


@contextlib.contextmanager
def without_rng_parity_draw():
    """Rotations built inside skip the (d, d - r) randn draw that keeps the global RNG stream in
    step with pyreft's. For modules whose weights are overwritten at once (a checkpoint load):
    the draw is wasted there, and thousands of such d x (d - r) temporaries fragment the heap
    (glibc keeps the freed memory), so 1,000 loaded adapters held ~96x their parameter bytes."""
    token = _PARITY_DRAW.set(False)
    try:
        yield
    finally:
        _PARITY_DRAW.reset(token)


class OrthonormalRotation(nn.Module):
    """R (r, d), fp32, orthonormal rows, as ``.weight``; the parametrisation is in the module doc.

    ``orthogonal_map``: "householder" (default; pyreft's optimisation trajectory) or
    "cholesky_qr" (opt-in). Construction draws from the global RNG exactly as pyreft's does
    (``orthogonal_`` on a (d, r) matrix, then the (d, d - r) completion draw), so the initial R
    and every later init (``learned_source``) match pyreft's for the same seed.
    ``completion`` (Householder map; :mod:`reft_kernels.interventions.completions`): None is the default,
    ``"pyreft"``, which keeps that draw's completion as pyreft does, so training from the same
    seed follows pyreft's exact path (see the module doc). ``pyreft_base``: True is
    ``completion="pyreft"`` and also asks the trainer for pyreft's data order (the attribute
    ``pyreft_base``; :func:`reft_kernels.training.trainer.follows_pyreft_base`); False is ``"compact"``;
    None leaves it to ``completion``.

    ``load_state_dict`` accepts our state of either map, pyreft's ``parametrizations.weight.*``
    keys, or ``weight`` (an R in our (r, d) or pyreft's (d, r) layout) and converts to this
    module's map; :meth:`pyreft_state` gives pyreft's (original, base) back.
    """

    base: Optional[torch.Tensor]

    def __init__(self, embed_dim: int, low_rank_dimension: int, orthogonal_map: str = HOUSEHOLDER,
                 pyreft_base: Optional[bool] = None, completion: Optional[str] = None):
        super().__init__()
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"orthogonal_map={orthogonal_map!r} is unknown; use one of {ORTHOGONAL_MAPS}")
        if orthogonal_map != HOUSEHOLDER and (pyreft_base or completion not in (None, COMPACT)):
            raise ValueError(f"pyreft_base=True / completion={completion!r} need orthogonal_map="
                             f"{HOUSEHOLDER!r} (the map with a base), not {orthogonal_map!r}")
        if orthogonal_map == HOUSEHOLDER:
            completion = resolve_completion(completion, pyreft_base)
        d, r = int(embed_dim), int(low_rank_dimension)
        self.orthogonal_map = orthogonal_map
        self.pyreft_base = bool(pyreft_base)   # pyreft's whole path asked for (not saved)
        init = torch.empty(d, r)
        nn.init.orthogonal_(init)
        fill = torch.randn(d, d - r) if _PARITY_DRAW.get() else None  # pyreft's completion draw
        if orthogonal_map == CHOLESKY_QR:
            self.basis = nn.Parameter(init.mT.contiguous())
            return
        self.reflectors = nn.Parameter(torch.zeros(d, r))
        self.register_buffer("signs", torch.full((r,), -1.0))
        self.register_buffer("base_householder", householder_form(init))
        # (a checkpoint load skips the draw: its state brings the base or the seed, if any)
        self.register_buffer("base", pyreft_completion(init, fill) if completion == PYREFT and fill is not None else None)
        seed = seed_from_draw(fill) if fill is not None else 0
        self.register_buffer("completion_seed", torch.tensor(seed) if completion == HARTLEY else None)
        self._set_factors()

    def _set_factors(self) -> None:
        """(Re)build the hartley completion's O(d) factors from ``completion_seed`` (not saved)."""
        factors = (None, None)
        if self.completion_seed is not None:
            r, d = self.shape
            factors = hartley_factors(d - r, int(self.completion_seed), self.reflectors.device)
        self.register_buffer("hartley_signs", factors[0], persistent=False)
        self.register_buffer("hartley_perm", factors[1], persistent=False)

    @property
    def completion(self) -> str:
        """Which completion of the base the state holds: "pyreft" (a d x d base), "hartley" (a
        seed) or "compact" (neither); see :mod:`reft_kernels.interventions.completions`."""
        if getattr(self, "base", None) is not None:
            return PYREFT
        return HARTLEY if getattr(self, "completion_seed", None) is not None else COMPACT

    def _complete(self, q: torch.Tensor) -> torch.Tensor:
        if self.hartley_signs is None:
            return q
        return complete_columns(q, (self.hartley_signs, self.hartley_perm))

    @property
    def shape(self) -> Tuple[int, int]:
        """(r, d)."""
        if self.orthogonal_map == CHOLESKY_QR:
            return tuple(self.basis.shape)
        return tuple(self.reflectors.shape[::-1])

    @property
    def weight(self) -> torch.Tensor:
        """R (r, d), fp32, orthonormal rows; differentiable in the trainable parameter.

        Computed with autocast off: under ``torch.autocast(bf16)`` (HF ``--bf16``) pyreft's
        ``base @ Q`` runs in bf16 (|R R^T - I| ~ 7e-4); ours stays fp32-orthonormal.
        """
        with torch.autocast(self._device.type, enabled=False):
            return self._weight()

    def _weight(self) -> torch.Tensor:
        if self.orthogonal_map == CHOLESKY_QR:
            return self._cholesky_qr(self.basis)
        # fp32 even if the module was cast (``.half()``): pyreft's R is fp32 too
        q = householder_columns(self.reflectors.float(), self.signs.float())
        if self.base is not None:
            return _FullBaseProduct.apply(self.base.float(), q)
        return apply_householder_base(self.base_householder.float(), self._complete(q)).mT.contiguous()

    @staticmethod
    def _cholesky_qr(basis: torch.Tensor) -> torch.Tensor:
        b = basis.double()
        chol, info = torch.linalg.cholesky_ex(b @ b.mT)
        if not _tracing(basis):  # one host sync on GPUs; skipped under torch.compile / graph capture
            pivots = chol.diagonal().abs()
            if info.item() != 0 or not bool(pivots.min() > _MIN_PIVOT_RATIO * pivots.max()):
                raise ValueError(
                    f"rotate_layer.basis is rank-deficient, zero or non-finite (Cholesky pivots "
                    f"min {pivots.min().item():.3g}, max {pivots.max().item():.3g}, info "
                    f"{info.item()}): R would not be orthonormal; set an orthonormal R with "
                    f"rotate_layer.set_weight(R) or use the default orthogonal_map='householder'")
        return torch.linalg.solve_triangular(chol, b, upper=False).float()

    @torch.no_grad()
    def set_weight(self, matrix: torch.Tensor, atol: float = _ORTHONORMAL_ATOL) -> None:
        """Set R from an orthonormal (r, d) matrix or pyreft's (d, r) ``rotate_layer`` weight.

        Householder map: re-anchors the parametrisation at R (``reflectors = 0``, base = the
        reflectors of R; a loaded d x d base is dropped), so R is set to fp32 rounding. Raises
        for a matrix that is not orthonormal (rank-deficient, zero, non-finite).
        """
        r, d = self.shape
        if tuple(matrix.shape) == (d, r) and d != r:
            matrix = matrix.mT
        if tuple(matrix.shape) != (r, d):
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}; pass R as ({r}, {d}) or pyreft's ({d}, {r})")
        matrix = matrix.to(device=self._device, dtype=torch.float32)
        err = _orthonormal_error(matrix)
        if not err <= atol:
            raise ValueError(f"matrix is not orthonormal (max |R R^T - I| = {err:.2e} > {atol}; "
                             "rank-deficient, zero or non-finite): pass a matrix with orthonormal "
                             "rows (or columns for pyreft's (d, r))")
        if self.orthogonal_map == CHOLESKY_QR:
            self.basis.copy_(matrix)
            return
        self.reflectors.zero_()
        self.signs.fill_(-1.0)
        self.base_householder.copy_(householder_form(matrix.mT))
        self.base = None
        self.pyreft_base = False

    def rebase(self) -> None:
        """Re-anchor at the current R: frees a loaded d x d base; R kept to fp32 rounding.

        The future trajectory changes (the completion and the point A = 0 move): call it between
        runs, not in the middle of one whose optimiser state you keep.
        """
        self.set_weight(self.weight.detach())

    @property
    def _device(self) -> torch.device:
        return (self.basis if self.orthogonal_map == CHOLESKY_QR else self.reflectors).device

    @torch.no_grad()
    def pyreft_state(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """pyreft's (``original`` (d, r), ``base`` (d, d)), fp32: the same R and, for the
        Householder map, the same optimisation trajectory (``original`` = our A + diag(signs))."""
        if self.orthogonal_map == CHOLESKY_QR:
            return rotation_to_pyreft(self.weight)
        original = self.reflectors.detach().tril(-1).clone()
        original.diagonal().copy_(self.signs)
        if self.base is not None:
            return original, self.base.detach().clone()
        d = self.reflectors.shape[0]
        eye = torch.eye(d, dtype=torch.float32, device=self._device)
        return original, apply_householder_base(self.base_householder.float(), self._complete(eye))

    @torch.no_grad()
    def _convert(self, incoming: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Incoming rotation state (any accepted key set) -> this module's state (may raise)."""
        r, d = self.shape
        dev = self._device
        get = {k: v.detach().to(dev) for k, v in incoming.items()}
        state: Optional[Dict[str, torch.Tensor]] = None   # Householder state, when given
        if PYREFT_ORIGINAL in get or PYREFT_BASE in get:
            if PYREFT_ORIGINAL not in get or PYREFT_BASE not in get:
                raise ValueError(f"pyreft's rotation needs both {PYREFT_ORIGINAL!r} and {PYREFT_BASE!r}")
            original, base = get[PYREFT_ORIGINAL].float(), get[PYREFT_BASE].float()
            if tuple(original.shape) != (d, r) or tuple(base.shape) != (d, d):
                raise ValueError(f"pyreft rotation shapes original {tuple(original.shape)}, base "
                                 f"{tuple(base.shape)}; this module needs ({d}, {r}) and ({d}, {d})")
            signs = original.diagonal().int().float()
            if not bool((signs != 0).all()):
                raise ValueError("pyreft's original has a diagonal entry whose int() is 0 (a "
                                 "weight-decayed pyreft rotation): its R is zero, not a rotation")
            state = {"reflectors": original.tril(-1), "signs": signs,
                     "base_householder": householder_form(base[:, :r]), "base": base}
        elif "reflectors" in get:
            state = {k: get[k] if k == "completion_seed" else get[k].float() for k in _HOUSEHOLDER_STATE if k in get}
            missing = [k for k in _HOUSEHOLDER_STATE[:3] if k not in state]
            if missing:
                raise ValueError(f"Householder rotation state lacks {missing}")
        if state is not None:
            q = householder_columns(state["reflectors"], state["signs"])
            full, seed = state.get("base"), state.get("completion_seed")
            if full is None and seed is not None:
                q = complete_columns(q, hartley_factors(d - r, int(seed), dev))
            R = (full @ q if full is not None else apply_householder_base(state["base_householder"], q)).mT
            _check_orthonormal(R, "the loaded rotation R")
            if full is not None and not _base_is_orthogonal(full):
                # e.g. after pyreft's own LoReFT load_state_dict, which writes R into base[:, :r]
                warnings.warn("the loaded d x d rotation base is not orthogonal (pyreft leaves it so "
                              "after its LoReFT load_state_dict): R is kept, the parametrisation is "
                              "re-anchored at R, so training will not follow pyreft's (non-"
                              "orthonormal) path", stacklevel=4)
                state = None
        elif "basis" in get:
            R = self._cholesky_qr(get["basis"].float())   # raises if rank-deficient
            if self.orthogonal_map == CHOLESKY_QR and tuple(get["basis"].shape) == (r, d):
                return {"basis": get["basis"]}            # same map: verbatim (exact resume)
        elif "weight" in get:
            R = get["weight"].float()
            R = R.mT if tuple(R.shape) == (d, r) and d != r else R
            _check_orthonormal(R, "the loaded rotation weight")
        else:
            raise ValueError(f"no rotation state among keys {sorted(get)}")
        if tuple(R.shape) != (r, d):
            raise ValueError(f"the loaded rotation has shape {tuple(R.shape)}, this module ({r}, {d})")
        if self.orthogonal_map == CHOLESKY_QR:
            return {"basis": R.contiguous()}
        if state is not None:
            return state
        state = {"reflectors": torch.zeros(d, r, device=dev), "signs": torch.full((r,), -1.0, device=dev),
                 "base_householder": householder_form(R.mT)}
        if getattr(self, "completion_seed", None) is not None:   # a bare R says nothing of the completion: keep ours
            state["completion_seed"] = self.completion_seed.clone()
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = _HOUSEHOLDER_STATE + ("basis", "weight", PYREFT_ORIGINAL, PYREFT_BASE)
        incoming = {n: state_dict.pop(prefix + n) for n in names if prefix + n in state_dict}
        if incoming:
            try:
                converted = self._convert(incoming)
            except ValueError as e:   # raised at once: torch's aggregate would add noise
                raise ValueError(f"loading {prefix[:-1] or type(self).__name__}: {e}") from None
            if self.orthogonal_map == HOUSEHOLDER:   # the state says which completion it has
                full, seed = converted.get("base"), converted.get("completion_seed")
                self.base = None if full is None else torch.empty_like(full)
                self.completion_seed = None if seed is None else torch.empty((), dtype=torch.int64,
                                                                             device=self._device)
            state_dict.update({prefix + k: v for k, v in converted.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if incoming and self.orthogonal_map == HOUSEHOLDER:
            self._set_factors()

    def extra_repr(self) -> str:
        r, d = self.shape
        completion = f", completion={self.completion!r}" if self.orthogonal_map == HOUSEHOLDER else ""
        return f"embed_dim={d}, low_rank_dimension={r}, orthogonal_map={self.orthogonal_map!r}{completion}"


class _FullBaseProduct(torch.autograd.Function):
    """R = (base @ Q)^T for a fixed d x d ``base``; the gradient ``(dR base)^T`` is formed as a
    (r x d) @ (d x d) product: on CPU BLAS ``base^T @ G`` (autograd's form) is ~10x slower at
    d = 4096, r = 4. Same values as autograd to fp32 rounding."""

    @staticmethod
    def forward(ctx, base, q):
        ctx.save_for_backward(base)
        return (base @ q).mT.contiguous()

    @staticmethod
    def backward(ctx, grad_r):
        (base,) = ctx.saved_tensors
        return None, (grad_r @ base).mT


def _tracing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
