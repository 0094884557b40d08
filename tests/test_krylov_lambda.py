"""The Krylov lambda solver against float64 SVD references, on degenerate shapes, and under TP.

References (tests/reference/svd_reference.py): ``h_ref`` is ``<Theta, U V^T>`` of the exact polar
factor and ``solve_lambda_ref`` bisects it to 1e-12. Tolerances: on the whole space the model is
the exact ``h`` up to its quadrature floor (``NODE_FLOOR`` acts only on singular values far below
the 0.05 of these gapped spectra) and fp32 round-off of the basis: measured <= 1.2e-5 in ``h``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_sso import SpectralSphere
from megatron_sso.ops import msign
from megatron_sso.ops.krylov_lambda import LambdaModel, solve_lambda_krylov, solve_model
from megatron_sso.ops.krylov_space import krylov_basis, krylov_blocks_for, orient
from megatron_sso.ops.lambda_solver import lambda_bound
from tests.distributed import harness, toy
from tests.reference.svd_reference import h_ref, msign_ref, solve_lambda_ref, top_triple_ref


def _problem(m, n, seed=0, align=0.3, floor=0.05):
    """Unit-norm momentum with singular values in [floor, 1] (scaled), partly aligned with the
    top pair of a random weight (as training momenta are: h(0) far from 0)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    M = (U * torch.linspace(1.0, floor, r, dtype=torch.float64)) @ V.T
    _, u, v = top_triple_ref(torch.randn(m, n, generator=g, dtype=torch.float64))
    M = M / M.norm() - align * torch.outer(u, v)
    return M / M.norm(), u, v


def _model(M, u, v, blocks):
    m, n = M.shape
    Y, a, b, split = orient(M[None].float(), u[None].float(), v[None].float(), (m, n), None)
    basis = krylov_basis(Y, a, b, krylov_blocks_for(min(m, n), blocks))
    return LambdaModel.from_basis(basis, lambda_bound(m, n))


def _h(model, lam):
    return model(torch.tensor([lam], dtype=torch.float64))[0].item()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)])
def test_whole_space_model_is_the_exact_h(shape):
    M, u, v = _problem(*shape)
    model = _model(M, u, v, blocks=64)
    lam_star = solve_lambda_ref(M, u, v)
    for lam in (-0.3, 0.0, lam_star, 0.05, 0.5):
        assert abs(_h(model, lam) - h_ref(M, u, v, lam)) <= 2e-5, lam


def test_truncated_space_error_shrinks_with_k():
    """Tall low-rank-plus-noise momentum (SPEC §8's prototype shape): the error of the model's
    h at the exact root falls with the block steps (measured 4.8e-2, 2.8e-3, 5e-6 at k = 2, 6, 16)."""
    g = torch.Generator().manual_seed(3)
    m, n = 256, 96
    M = torch.randn(m, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    M = M / M.norm() + 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    _, u, v = top_triple_ref(torch.randn(m, n, generator=g, dtype=torch.float64))
    M = M / M.norm() - 0.3 * torch.outer(u, v)
    M = M / M.norm()
    lam_star = solve_lambda_ref(M, u, v)
    errs = [abs(_h(_model(M, u, v, k), lam_star)) for k in (2, 6, 16)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] <= 1e-4, errs


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16), (1, 9), (9, 1)])
def test_root_and_direction_match_svd_bisection(shape):
    M, u, v = _problem(*shape, seed=1)
    lam_star = solve_lambda_ref(M, u, v)
    sol = solve_lambda_krylov(M[None].float(), u[None].float(), v[None].float(), msign, torch.zeros(1),
                              blocks=64, bound=lambda_bound(*shape))
    assert sol.calls == 1
    assert abs(sol.lam.item() - lam_star) <= 1e-4 * max(1.0, abs(lam_star)), (sol.lam.item(), lam_star)
    exact = msign_ref(M + lam_star * torch.outer(u, v))
    assert (sol.phi[0].double() - exact).abs().max().item() <= 1e-4
    assert sol.h_raw.item() <= 2e-4  # the msign at the model's root, before the projection
    assert abs(sol.h.item()) <= 1e-6  # the applied direction is tangent


def test_newton_from_any_start_reaches_the_root():
    M, u, v = _problem(32, 48, seed=2)
    model = _model(M, u, v, blocks=64)
    bound = lambda_bound(32, 48)
    lam, slope = solve_model(model, torch.tensor([-bound, -1.0, 0.0, 3.0, bound], dtype=torch.float64), bound)
    ref = solve_lambda_ref(M, u, v)
    assert (lam - ref).abs().max().item() <= 1e-5
    assert (slope > 0).all()


def _degenerate(name):
    g = torch.Generator().manual_seed(5)
    m, n = (1, 12) if name == "1xN" else (12, 1) if name == "Nx1" else (20, 30)
    _, u, v = top_triple_ref(torch.randn(m, n, generator=g, dtype=torch.float64))
    if name in ("1xN", "Nx1"):
        M = torch.randn(m, n, generator=g, dtype=torch.float64)
    elif name == "rank1":
        M = torch.outer(torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
    elif name == "rank3":
        M = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    elif name == "theta":  # M = -Theta: the root makes X = 0 (lambda* = 1)
        M = -torch.outer(u, v)
    else:
        M = torch.zeros(m, n, dtype=torch.float64)
    nrm = M.norm()
    return (M / nrm if nrm > 0 else M), u, v


@pytest.mark.parametrize("name", ["1xN", "Nx1", "rank1", "rank3", "theta", "zero"])
def test_degenerate_momenta_never_nan(name):
    M, u, v = _degenerate(name)
    for lam0 in (0.0, 0.7):
        sol = solve_lambda_krylov(M[None].float(), u[None].float(), v[None].float(), msign,
                                  torch.full((1,), lam0), blocks=8, bound=lambda_bound(*M.shape))
        for t in (sol.lam, sol.h, sol.phi, sol.slope, sol.h_raw):
            assert torch.isfinite(t).all(), (name, lam0)
        assert abs(sol.h.item()) <= 1e-5, (name, sol.h.item())
        if name == "zero":
            assert sol.phi.abs().max().item() <= 1e-3  # Theta - h Theta up to NS round-off (8e-5)
        if name == "rank3":  # u outside M's range: h jumps at lambda = 0, the root sits there
            lam_star = solve_lambda_ref(M, u, v)
            assert abs(sol.lam.item() - lam_star) <= 1e-4, (sol.lam.item(), lam_star)


def test_optimizer_spends_one_msign_per_matrix_and_tracks_a_tight_bisection():
    """Three SSO steps with the Krylov solver against the same steps with the reference
    bisection run to |h| <= 1e-7: one msign per matrix on every step (cold ones too), and the
    weights agree to 2e-5 (measured 3e-6; MuonSphere's steps differ from both by ~1e-3)."""
    shapes = [(16, 40), (40, 16), (24, 24), (1, 9)]

    def run(**cfg):
        params = [torch.nn.Parameter(toy._gapped(m, n, torch.Generator().manual_seed(i)))
                  for i, (m, n) in enumerate(shapes)]
        opt = SpectralSphere(params, lr=0.02, **cfg)
        g = torch.Generator().manual_seed(1)
        calls = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            calls.append(opt.last_step_stats["msign_calls_per_matrix"])
        return [p.detach().clone() for p in params], calls

    ours, calls = run(lambda_solver="krylov")
    ref, _ = run(lambda_solver="bisect", lambda_tol=1e-7, lambda_max_iter=60)
    ms, _ = run(mode="muon_sphere")
    assert calls == [1.0, 1.0, 1.0]
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    gap = max((a - b).abs().max().item() for a, b in zip(ms, ref))
    assert diff <= 2e-5 and gap > 20 * diff, (diff, gap)


# --- tensor parallelism: 4 gloo processes, TP = 1, 2, 4 against one process -----------------

WORLD = 4


def _tp_worker(rank: int, world: int) -> dict:
    from megatron_sso.distributed.tensor_parallel import make_allreduce
    from megatron_sso.optim.distributed_sphere import DistributedSpectralSphere
    from tests.distributed.test_tensor_parallel import _groups, _split

    groups = _groups(rank)
    out = {}
    problems = [(pdim, shape, _problem(*shape, seed=7 + pdim)) for pdim in (0, 1) for shape in ((16, 24), (24, 16))]
    for tp in (1, 2, 4):
        group = groups[tp]
        r = dist.get_rank(group)
        ar = make_allreduce(group)
        for pdim, shape, (M, u, v) in problems:
            ref = solve_lambda_krylov(M[None].float(), u[None].float(), v[None].float(), msign, torch.zeros(1),
                                      blocks=4, bound=lambda_bound(*shape))
            us = _split(u.float(), 0, tp, r) if pdim == 0 else u.float()
            vs = _split(v.float(), 0, tp, r) if pdim == 1 else v.float()
            mine = solve_lambda_krylov(
                _split(M.float(), pdim, tp, r)[None], us[None], vs[None],
                lambda x: msign(x, allreduce=ar, partition_dim=pdim), torch.zeros(1), blocks=4,
                bound=lambda_bound(*shape), full_shape=shape, allreduce=ar, partition_dim=pdim)
            out[("ops", tp, pdim, shape)] = max(abs(mine.lam.item() - ref.lam.item()),
                                                (mine.phi[0] - _split(ref.phi[0], pdim, tp, r)).abs().max().item())
        cfg = {"power_iters_cold": 4, "lambda_solver": "krylov"}
        ref_traj = toy.reference_run(3, 0.05, **cfg)
        layer = toy.ShardedLayer(toy.full_weights(), tp=tp, tp_rank=r)
        opt = DistributedSpectralSphere(layer.modules, lr=0.05, tp_group=group, tp_mode="sharded", **cfg)
        diffs = []
        for step in range(3):
            layer.set_grads(toy.full_grads(step))
            opt.step()
            diffs.append(layer.max_diff(ref_traj[step]))
        out[("traj", tp)] = diffs
        out[("calls", tp)] = opt.last_step_stats["msign_calls_per_matrix"]
    return out


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    return harness.run(_tp_worker, WORLD)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_equals_one_process(tp_results, tp):
    for res in tp_results:
        for key, diff in res.items():
            if key[0] == "ops" and key[1] == tp:
                assert diff <= 1e-5, (key, diff)
        assert max(res[("traj", tp)]) <= 1e-5, res[("traj", tp)]
        assert res[("calls", tp)] == 1.0
