"""Householder reflectors in torch's non-trivialised form, applied in the compact WY form.

A (d, r) ``form`` holds r reflectors: strict lower triangle = the reflector tails V, diagonal =
signs t. ``H_j = I - tau_j v_j v_j^T`` with ``v_j = e_j + V[:, j]`` and torch's
``tau_j = 2 / (1 + |V[:, j]|^2)``. With V1 = V + I[:, :r] and G = V1^T V1 the product is, by the
UT transform (Joffrain et al. 2006),

    H_1 ... H_r = I - V1 T V1^T,   T^{-1} = triu(G, 1) + diag(G) / 2

so every product below costs O(d r^2) and nothing d x d is formed.
"""
from __future__ import annotations

import torch

__all__ = ["householder_columns", "householder_form", "apply_householder_base"]


def _compact_wy(form: torch.Tensor):
    """(V1, T^{-1}) of H_1 ... H_r = I - V1 T V1^T for the reflector tails in ``tril(form, -1)``.

    V1 = tril(form, -1) + I[:, :r] (unit lower trapezoidal), tau_j = 2 / (v_j^T v_j) (torch's
    ``2 / (1 + |tail|^2)``), and by the UT transform T^{-1} = triu(G, 1) + diag(G) / 2 with
    G = V1^T V1 (the diagonal is 1 / tau).
    """
    d, r = form.shape
    v = form.tril(-1) + torch.eye(d, r, dtype=form.dtype, device=form.device)
    gram = v.mT @ v
    return v, gram.triu(1) + torch.diag_embed(gram.diagonal() / 2)


def householder_columns(tails: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Q (d, r) = householder_product(A, tau) * signs with A = tril(tails, -1) and torch's tau.

    Computed as ``(I - V1 T V1^T)[:, :r] = I[:, :r] - V1 T V1[:r]^T`` (compact WY form), equal
    to ``torch.linalg.householder_product`` to fp32 rounding: the same function, with plain
    matmul/triangular-solve autograd, O(d r^2) forward and backward, where torch's
    ``householder_product`` backward costs about a second at d = 2048, r = 16 on one CPU core
    (see benchmarks/bench_rotation.py).
    """
    d, r = tails.shape
    v, t_inv = _compact_wy(tails)
    eye = torch.eye(d, r, dtype=tails.dtype, device=tails.device)
    return (eye - v @ torch.linalg.solve_triangular(t_inv, v[:r].mT, upper=True)) * signs


@torch.no_grad()
def householder_form(columns: torch.Tensor) -> torch.Tensor:
    """(d, r) torch non-trivialised Householder form of orthonormal ``columns`` (d, r).

    Strict lower triangle: the reflector tails of ``geqrf(columns)``; diagonal: the signs t with
    ``householder_columns(form, t) == columns`` to rounding (torch's ``right_inverse``: sign of
    the R factor's diagonal, flipped where LAPACK's tau is 0, i.e. no reflection was needed).
    """
    A, tau = torch.geqrf(columns.float())
    signs = A.diagonal().sign()
    signs[tau == 0.0] *= -1
    form = A.tril(-1)
    form.diagonal().copy_(signs)
    return form


def apply_householder_base(form: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``base @ x`` for ``base = H_1 ... H_r diag(t, 1, ..., 1)`` given by ``form`` (see module doc)."""
    r = form.shape[1]
    v, t_inv = _compact_wy(form)
    y = torch.cat([x[:r] * form.diagonal().unsqueeze(-1), x[r:]])
    return y - v @ torch.linalg.solve_triangular(t_inv, v.mT @ y, upper=True)
