"""The sync-free Rayleigh-Ritz pieces (ops/ritz.py, ops/power_iteration.py's Cholesky-QR)
against float64 SVD, on the spectra the optimizer meets."""

import pytest
import torch

from megatron_sso.ops import block_power_iteration
from megatron_sso.ops.power_iteration import _chol_orthonormalise
from megatron_sso.ops.ritz import rotate_first_column, top_right_singular, top_right_singular_reference


def _with_spectrum(s: torch.Tensor) -> torch.Tensor:
    B, b = s.shape
    U, _ = torch.linalg.qr(torch.randn(B, b, b, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(B, b, b, dtype=torch.float64))
    return (U * s.unsqueeze(-2)) @ V.mT


def _spectra() -> dict[str, tuple[torch.Tensor, float]]:
    B, b = 64, 16
    flat = torch.rand(B, b, dtype=torch.float64)
    flat[:, :8] = 1 - 1e-6 * torch.rand(B, 8, dtype=torch.float64)  # a sphere-flattened top
    low = flat.clone()
    low[:, 4:] = 0
    equal = torch.full((B, b), 0.5, dtype=torch.float64)
    equal[:, :3] = 1.0
    # (S, tolerance on sigma's relative error); measured: 1.1e-15, 1.4e-8, 4.2e-9, 8.9e-16
    return {"gaussian": (torch.randn(B, b, b, dtype=torch.float64), 1e-13),
            "flattened top (8 within 1e-6)": (_with_spectrum(flat), 1e-7),
            "rank 4 of 16": (_with_spectrum(low), 1e-7),
            "three equal top": (_with_spectrum(equal), 1e-13)}


@pytest.mark.parametrize("case", list(_spectra()))
def test_top_pair_matches_svd(case):
    S, tol = _spectra()[case]
    sigma, y = top_right_singular(S)
    ref, _ = top_right_singular_reference(S)
    assert ((sigma - ref).abs() / ref).max() < tol
    assert torch.allclose(y.norm(dim=-1), torch.ones(S.size(0), dtype=torch.float64), atol=1e-12)
    assert torch.allclose((S @ y.unsqueeze(-1)).squeeze(-1).norm(dim=-1), sigma, rtol=1e-14)


def test_zero_and_one_by_one():
    sigma, y = top_right_singular(torch.zeros(3, 4, 4))
    assert torch.all(sigma == 0) and torch.all(y[:, 0] == 1) and torch.all(y[:, 1:] == 0)
    S = torch.randn(5, 1, 1, dtype=torch.float64)
    sigma, y = top_right_singular(S)
    assert torch.allclose(sigma, S.abs().view(5)) and torch.all(y.abs() == 1)


def test_rotation_keeps_the_block_orthonormal_and_puts_y_first():
    y = torch.nn.functional.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    y[0] = 0
    y[0, 0] = 1.0  # e_1 itself: the identity
    H = rotate_first_column(y)
    assert torch.allclose(H.mT @ H, torch.eye(16, dtype=torch.float64).expand(7, 16, 16), atol=1e-13)
    assert torch.allclose(H[..., 0], y, atol=1e-14)
    assert torch.equal(H[0], torch.eye(16, dtype=torch.float64))


def test_block_power_iteration_matches_the_exact_norm():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(6, 48, 40, generator=gen)
    sigma, u, v, block = block_power_iteration(W, iters=30, block=8)
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    assert ((sigma.double() - exact).abs() / exact).max() < 1e-5
    assert torch.allclose(block.mT @ block, torch.eye(8).expand(6, 8, 8), atol=1e-5)
    assert torch.allclose(block[..., 0], v)
    assert torch.allclose((W @ v.unsqueeze(-1)).squeeze(-1), sigma.unsqueeze(-1) * u, atol=1e-4)


def test_cholesky_qr_survives_a_nearly_rank_deficient_block():
    """Columns 1e-4 apart: float32 round-off of the Gram beats the 1e-7 shift. The old
    ``torch.linalg.cholesky`` raised here (and synchronised to find out); the rescue shift,
    picked on the device, gives columns orthonormal to 6.3e-3 (measured) and of full rank."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 256, 1, generator=gen)
    V = base + 1e-4 * torch.randn(4, 256, 6, generator=gen)
    Q = _chol_orthonormalise(V, None)
    assert torch.isfinite(Q).all()
    assert (Q.mT @ Q - torch.eye(6)).abs().max() < 0.02
    span = torch.linalg.matrix_rank(Q.double(), atol=0.5)
    assert torch.all(span == 6)
