"""pyreft's rotation state <-> an R (r, d) with orthonormal rows, with torch's own ops.

pyreft stores a rotated intervention's R through ``torch.nn.utils.parametrizations.orthogonal``:
``original`` (d, r) and a fixed ``base`` (d, d), materialised as
``R^T = base @ (householder_product(tril(original, -1), tau) * diag(original).int())``.
:mod:`reft_kernels.interventions.rotation` holds the trajectory-preserving parametrisation; these two functions
convert a plain R for export and import.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["pyreft_completion", "rotation_from_pyreft", "rotation_to_pyreft"]


def rotation_from_pyreft(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R (r, d) fp32 from pyreft's ``original`` (d, r) and ``base`` (d, d): torch's own ops."""
    with torch.no_grad():
        a = original.detach().float().tril(-1)
        q = torch.linalg.householder_product(a, 2.0 / (1.0 + (a * a).sum(dim=-2)))
        q = q * original.detach().diagonal().int()
        return (base.detach().float() @ q).mT.contiguous()


def rotation_to_pyreft(R: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(original (d, r), base (d, d)) fp32 with pyreft's materialised weight exactly R^T.

    ``original = -I`` and ``base`` = an orthonormal completion of R^T (a seeded randn draw, the
    caller's RNG untouched) with ``base[:, :r] = R^T`` exactly. For rotations that carry no
    Householder state (the Cholesky-QR map); :meth:`OrthonormalRotation.pyreft_state` exports
    the trajectory-preserving state instead.
    """
    Rt = R.detach().float().mT.contiguous()
    d, r = Rt.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    fill = torch.randn(d, d - r, generator=gen).to(Rt.device)
    q, upper = torch.linalg.qr(torch.cat([Rt, fill], 1))
    base = q * upper.diagonal().sign()
    base[:, :r] = Rt
    original = torch.zeros(d, r, device=Rt.device)
    original.diagonal().fill_(-1.0)
    return original, base


def pyreft_completion(init: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """pyreft's fixed ``base`` (d, d) for an initial R^T ``init`` (d, r) and the (d, d - r) randn
    ``fill`` drawn right after it: torch's ``orthogonal`` parametrisation (``right_inverse`` with
    trivialisation) completes ``[init, fill]`` to the Q factor of its QR decomposition with
    diag(R) >= 0 (torch's ``_make_orthogonal``), the same ops in the same order, so the same
    numbers: ``base[:, :r] = init`` to fp32 rounding."""
    with torch.no_grad():
        x, tau = torch.geqrf(torch.cat([init, fill], dim=-1))
        q = torch.linalg.householder_product(x, tau)
        q *= x.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
        return q
