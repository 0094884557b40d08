"""Power iteration and the lambda solvers against float64 SVD references."""

import math

import pytest
import torch

from megatron_sso.ops import (
    TangentResidual,
    block_power_iteration,
    msign,
    power_iteration,
    solve_lambda_bisect,
    solve_lambda_secant,
    uv_inner,
)
from tests.reference.svd_reference import cosine, h_ref, msign_ref, solve_lambda_ref, top_triple_ref


def _gapped(m, n, seed=0, gap=0.7):
    """Random matrix whose second singular value is ``gap`` times the first."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.linspace(gap, 0.05, min(m, n), dtype=torch.float64)
    s[0] = 1.0
    return ((U * s) @ V.T).float()


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (24, 24), (16, 40), (40, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_sigma_matches_matrix_norm(shape, seed):
    # A single vector converges like (sigma_2/sigma_1)^(2k): use a gapped matrix for it, and
    # the block iteration (what the optimizer uses on a cold start) for a gapless Gaussian.
    sigma, _, _ = power_iteration(_gapped(*shape, seed=seed), iters=50)
    exact = torch.linalg.matrix_norm(_gapped(*shape, seed=seed).double(), ord=2).item()
    assert abs(sigma.item() - exact) / exact < 1e-6
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    sigma, _, _, _ = block_power_iteration(W, iters=50)
    exact = torch.linalg.matrix_norm(W.double(), ord=2).item()
    assert abs(sigma.item() - exact) / exact < 1e-5


def test_power_iteration_vectors_and_warm_start():
    W = _gapped(30, 50)
    s_ref, u_ref, v_ref = top_triple_ref(W)
    sigma, u, v = power_iteration(W, iters=40)
    assert abs(float(u.double() @ u_ref)) > 1 - 1e-6 and abs(float(v.double() @ v_ref)) > 1 - 1e-6
    # A slightly perturbed matrix, warm-started from the old vector: 2 iterations suffice.
    W2 = W + 1e-3 * torch.randn_like(W)
    s2, _, _ = power_iteration(W2, v0=v, iters=2)
    exact = torch.linalg.matrix_norm(W2.double(), ord=2).item()
    assert abs(s2.item() - exact) / exact < 1e-5


def test_power_iteration_zero_matrix_keeps_a_unit_vector():
    sigma, u, v = power_iteration(torch.zeros(4, 6), iters=3)
    assert sigma.item() == 0 and torch.isfinite(u).all()
    assert abs(v.norm().item() - 1) < 1e-6


def _problem(m=24, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, n, generator=g, dtype=torch.float64)
    M /= M.norm()
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    _, u, v = top_triple_ref(W)
    return M, u, v


def _residual(M, u, v):
    return TangentResidual(M.float(), u.float(), v.float(), lambda X: msign(X))


def test_h_matches_reference_and_is_monotone():
    M, u, v = _problem()
    R = _residual(M, u, v)
    values = []
    for lam in (-0.2, -0.02, 0.0, 0.02, 0.2):
        h, _ = R(torch.tensor(lam))
        assert abs(h.item() - h_ref(M, u, v, lam)) < 1e-4
        values.append(h.item())
    assert values == sorted(values) and -1 <= values[0] and values[-1] <= 1


def test_bisect_reference_solver_reaches_tolerance():
    M, u, v = _problem()
    sol = solve_lambda_bisect(_residual(M, u, v), tol=2e-4, max_iter=20)
    assert abs(sol.h.item()) <= 2e-4
    lam_star = solve_lambda_ref(M, u, v)
    assert cosine(sol.phi, msign_ref(M + lam_star * torch.outer(u, v))) > 0.999
    assert sol.calls >= 2  # 1 at zero, then bracketing and bisection


@pytest.mark.parametrize("evals", [2, 4])
def test_secant_cold_start_is_tangent_and_close_to_exact(evals):
    M, u, v = _problem(seed=3)
    R = _residual(M, u, v)
    sol = solve_lambda_secant(R, torch.zeros(()), None, evals)
    assert R.calls == evals
    assert abs(sol.h.item()) <= 2e-4
    assert abs(uv_inner(sol.phi, R.u, R.v).item()) <= 2e-4  # h is measured on the direction
    lam_star = solve_lambda_ref(M, u, v)
    exact = msign_ref(M + lam_star * torch.outer(u, v))
    # Cold two-point interpolation: second-order error in the bracket width (docs/algorithm.md).
    assert cosine(sol.phi, exact) > (0.99 if evals == 2 else 0.999)


def test_secant_warm_start_matches_reference_direction():
    M, u, v = _problem(seed=4)
    lam_star = solve_lambda_ref(M, u, v)
    d = 1e-6
    slope = (h_ref(M, u, v, lam_star + d) - h_ref(M, u, v, lam_star - d)) / (2 * d)
    # Warm start from a nearby root with last step's slope off by 30%.
    sol = solve_lambda_secant(_residual(M, u, v), torch.tensor(lam_star * 0.8 + 1e-4),
                              torch.tensor(slope * 1.3), 2)
    assert abs(sol.h.item()) <= 2e-4
    assert cosine(sol.phi, msign_ref(M + lam_star * torch.outer(u, v))) > 0.9999
    assert abs(sol.lam.item() - lam_star) < 1e-3 * max(1.0, abs(lam_star))


def test_batched_secant_equals_per_matrix():
    probs = [_problem(seed=s) for s in range(3)]
    M = torch.stack([p[0] for p in probs]).float()
    u = torch.stack([p[1] for p in probs]).float()
    v = torch.stack([p[2] for p in probs]).float()
    batched = solve_lambda_secant(TangentResidual(M, u, v, lambda X: msign(X)), torch.zeros(3), None, 3)
    for i in range(3):
        one = solve_lambda_secant(TangentResidual(M[i], u[i], v[i], lambda X: msign(X)), torch.zeros(()), None, 3)
        assert math.isclose(one.lam.item(), batched.lam[i].item(), rel_tol=1e-3, abs_tol=1e-6)
