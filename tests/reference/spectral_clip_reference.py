"""Float64 SVD references for SPECTRA spectral clipping (SPEC §5).

The slow, obviously-correct definitions that ``megatron_sso.ops.spectral_clip`` is tested
against: apply a scalar map to the singular values of ``X`` in float64 and keep the singular
vectors. (``svd_reference.py`` holds the SSO references; these are the clip-specific ones.)
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def svd64(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``X = U diag(S) Vh`` in float64 (batched)."""
    return torch.linalg.svd(X.double(), full_matrices=False)


def apply_singular_value_map(X: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """``U f(S) V^T`` in float64: the exact spectral function of ``X``."""
    U, S, Vh = svd64(X)
    return (U * f(S).unsqueeze(-2)) @ Vh


def soft_clip_scalar(sigma: Tensor, c: float) -> Tensor:
    """SPECTRA's soft clip of one singular value: ``sigma / sqrt(1 + sigma^2 / c^2)``."""
    sigma = sigma.double()
    return sigma / torch.sqrt(1.0 + (sigma / c) ** 2)


def floored_soft_clip_scalar(sigma: Tensor, c: float, mu: float) -> Tensor:
    """The soft clip of ``mu I + X^T X / c^2`` instead of ``I + ...``: ``sigma / sqrt(mu + sigma^2/c^2)``."""
    sigma = sigma.double()
    return sigma / torch.sqrt(mu + (sigma / c) ** 2)


def soft_clip_ref(X: Tensor, c: float) -> Tensor:
    """``H_c(X) = (I + X X^T / c^2)^(-1/2) X`` exactly (float64)."""
    return apply_singular_value_map(X, lambda s: soft_clip_scalar(s, c))


def hard_clip_ref(X: Tensor, c: float) -> Tensor:
    """``U min(S, c) V^T`` exactly (float64)."""
    return apply_singular_value_map(X, lambda s: s.clamp_max(c))


def coordinates_in_singular_basis(H: Tensor, X: Tensor) -> Tensor:
    """``diag(U^T H V)`` for the SVD of ``X``: the values ``H`` puts on ``X``'s singular pairs.

    For a spectral function ``H = U f(S) V^T`` these are exactly ``f(S)``; unlike
    ``svdvals(H)`` they also fail if ``H`` rotates the singular vectors.
    """
    U, _, Vh = svd64(X)
    return (U.mT @ H.double() @ Vh.mT).diagonal(dim1=-2, dim2=-1)


def matrix_with_spectrum(m: int, n: int, singular_values: Tensor, seed: int = 0) -> Tensor:
    """A float64 ``m x n`` matrix with the given singular values and Haar-random vectors."""
    k = min(m, n)
    if singular_values.numel() != k:
        raise ValueError(f"need {k} singular values for a {m}x{n} matrix, got {singular_values.numel()}")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * singular_values.double()) @ V.mT
