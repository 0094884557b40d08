"""Float64 SVD references for every fast path of the SSO math.

These are the slow, obviously-correct definitions (SPEC §2) that the Newton-Schulz, power
iteration and solver code is tested against. Tolerances in the tests are stated relative to
these functions and say where they come from.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

RANK_EPS = 1e-12
"""Singular values below RANK_EPS * sigma_max count as zero (msign maps them to 0)."""


def msign_ref(X: Tensor) -> Tensor:
    """Exact ``U V^T`` in float64 (singular values below the rank threshold map to 0)."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    keep = (S > RANK_EPS * S.amax(dim=-1, keepdim=True).clamp_min(1e-300)).double()
    return (U * keep.unsqueeze(-2)) @ Vh


def top_triple_ref(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sigma_1, u_1, v_1`` of ``W`` in float64."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return S[..., 0], U[..., :, 0], Vh[..., 0, :]


def h_ref(M: Tensor, u: Tensor, v: Tensor, lam: float) -> float:
    """``<u v^T, msign(M + lam u v^T)>`` exactly."""
    X = M.double() + lam * torch.outer(u.double(), v.double())
    return float(u.double() @ msign_ref(X) @ v.double())


def solve_lambda_ref(M: Tensor, u: Tensor, v: Tensor, tol: float = 1e-12) -> float:
    """Root of the exact ``h`` by bisection on ``[-B, B]`` with ``B = 2 ||M||_* + 1``.

    ``h`` is non-decreasing with ``h(-B) <= 0 <= h(B)`` (paper App. A.2), so 200 halvings
    reach float64 resolution.
    """
    B = 2.0 * float(torch.linalg.matrix_norm(M.double(), ord="nuc")) + 1.0
    lo, hi = -B, B
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        hm = h_ref(M, u, v, mid)
        if abs(hm) <= tol:
            return mid
        if hm > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def sso_direction_ref(M: Tensor, W: Tensor) -> tuple[Tensor, float]:
    """The exact SSO direction ``msign(M_hat + lam* u v^T)`` for weight ``W`` and input ``M``."""
    Mh = M.double() / M.double().norm()
    _, u, v = top_triple_ref(W)
    lam = solve_lambda_ref(Mh, u, v)
    return msign_ref(Mh + lam * torch.outer(u, v)), lam


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))
