"""Muon-Hyperball (``mode="hyperball"``): the batched step against a float64 reference written from
the paper's definition (arXiv 2606.16899; exact SVD polar factor, not Newton-Schulz), the Frobenius
radius held over many steps, skipping, and TP shards (2 gloo processes, sharded Frobenius norms and
msign through the TP hooks) against one process."""

from __future__ import annotations

import pytest
import torch

from megatron_sso.ops.frobenius import frobenius_norm, frobenius_retraction_factor, hyperball_step_
from megatron_sso.optim import SpectralSphere, SphereConfig
from megatron_sso.optim.hyperball import HyperballBuffers, hyperball_reference_step, hyperball_update_
from tests.distributed import harness

CFG = SphereConfig(mode="hyperball")


def _trajectory(shape, c, steps, lr, seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(batch, *shape, generator=gen, dtype=torch.float64) * 0.02
    grads = [torch.randn(batch, *shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return W0, grads, SphereConfig(mode="hyperball", radius_scaler=c)


@pytest.mark.parametrize("shape,c", [((8, 12), 1.0), ((12, 8), 2.0), ((16, 20), 0.5)])  # non-square: no singular value near 0 (NS cannot reach it)
def test_batched_step_matches_float64_reference(shape, c):
    W0, grads, cfg = _trajectory(shape, c, steps=4, lr=0.05)
    W = W0.float().clone()
    bufs = HyperballBuffers(torch.zeros_like(W), torch.zeros(W.size(0)))
    ref = [(W0[i].clone(), torch.zeros(shape, dtype=torch.float64), None) for i in range(W.size(0))]
    worst = 0.0
    for G in grads:
        hyperball_update_(W, G.float(), bufs, cfg, 0.05)
        ref = [hyperball_reference_step(w, G[i], mom, R, cfg, 0.05) for i, (w, mom, R) in enumerate(ref)]
        for i, (w, mom, R) in enumerate(ref):
            worst = max(worst, float((W[i].double() - w).norm() / w.norm()))
            assert float(bufs.radius[i]) == pytest.approx(R, rel=1e-6)
            assert torch.allclose(bufs.momentum[i].double(), mom, rtol=1e-5, atol=1e-6)
    # fp32 Newton-Schulz (sso8 lands singular values within 1e-6 of 1) vs the exact polar factor:
    # measured 1.3e-7 to 1.4e-7 over the three shapes
    assert worst < 1e-6, worst
    assert float(bufs.radius[0]) == pytest.approx(c * float(W0[0].norm()), rel=1e-6)  # R = c ||W_0||_F


def test_the_step_turns_the_weight_by_lr():
    # ||W_new - W|| / R ~ lr: the step is lr R long before the retraction, which shortens it by
    # a factor 1/sqrt(1 + lr^2) radially and turns it by lr's angle at most
    W0, grads, cfg = _trajectory((32, 16), 1.0, steps=1, lr=0.01, batch=1)
    W = W0.float().clone()
    bufs = HyperballBuffers(torch.zeros_like(W), torch.zeros(1))
    hyperball_update_(W, grads[0].float(), bufs, cfg, 0.01)
    moved = float((W.double() - W0).norm() / W0.norm())
    assert 0.0095 < moved < 0.0101, moved


def test_frobenius_norm_stays_on_its_radius_over_many_steps():
    W0, grads, cfg = _trajectory((24, 40), 2.0, steps=200, lr=0.1, seed=3, batch=4)
    W = W0.float().clone()
    bufs = HyperballBuffers(torch.zeros_like(W), torch.zeros(4))
    R = 2.0 * frobenius_norm(W)  # what the first step computes, in fp32
    worst = 0.0
    for G in grads:
        stats = hyperball_update_(W, G.float(), bufs, cfg, 0.1)
        worst = max(worst, float((frobenius_norm(W.double()) / R.double() - 1).abs().max()))
    assert worst < 1e-6, worst
    assert torch.equal(bufs.radius, R)  # the radius is the first step's, never recomputed
    assert float((stats.sigma - 1).abs().max()) < 1e-6  # the step-start weights were on the ball too


def test_nonfinite_gradient_leaves_that_matrix_untouched():
    W0, grads, cfg = _trajectory((8, 8), 1.0, steps=1, lr=0.05, batch=2)
    W = W0.float().clone()
    G = grads[0].float()
    G[1, 0, 0] = float("nan")
    bufs = HyperballBuffers(torch.zeros_like(W), torch.zeros(2))
    stats = hyperball_update_(W, G, bufs, cfg, 0.05)
    assert int(stats.skipped) == 1
    assert torch.equal(W[1], W0[1].float()) and float(bufs.radius[1]) == 0.0 and not bufs.momentum[1].any()
    assert not torch.equal(W[0], W0[0].float())


def test_spectral_sphere_class_runs_hyperball_and_sso_refuses_the_radius_free_path():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    R = 3.0 * float(p.detach().norm())
    opt = SpectralSphere([p], lr=0.1, mode="hyperball", radius_scaler=3.0)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    assert abs(float(p.detach().norm()) / R - 1) < 1e-6
    assert float(opt.state[p]["hyperball_radius"]) == pytest.approx(R, rel=1e-6)
    from megatron_sso.optim.sphere_update import SphereBuffers, sphere_update_

    with pytest.raises(ValueError, match="hyperball"):
        sphere_update_(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), SphereBuffers(torch.zeros(1, 2, 2), None,
                       torch.zeros(1), torch.zeros(1)), CFG, 0.1, 1.0, 1.0)


def test_retraction_factor_and_zero_matrix():
    assert torch.equal(frobenius_retraction_factor(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])),
                       torch.tensor([1.0, 0.5]))
    W = torch.zeros(1, 3, 3)
    hyperball_step_(W, torch.ones(1, 3, 3), torch.zeros(1), 0.1)
    assert not W.any()  # no direction to keep: a zero weight stays zero


STEPS = 3


def _tp_worker(rank: int, world: int) -> dict:
    from megatron_sso.distributed.tensor_parallel import make_allreduce
    from megatron_sso.optim.sphere_update import ShardHooks

    gen = torch.Generator().manual_seed(11)
    W0 = torch.randn(2, 16, 24, generator=gen) * 0.02
    grads = [torch.randn(2, 16, 24, generator=gen) for _ in range(STEPS)]
    out = {}
    for pdim in (0, 1):
        for method in ("standard", "gram"):
            cfg = SphereConfig(mode="hyperball", radius_scaler=1.5, msign_method=method)
            whole = W0.clone()
            full_bufs = HyperballBuffers(torch.zeros_like(whole), torch.zeros(2))
            shard = W0.chunk(world, dim=pdim + 1)[rank].clone()
            bufs = HyperballBuffers(torch.zeros_like(shard), torch.zeros(2))
            hooks = ShardHooks(make_allreduce(torch.distributed.group.WORLD), pdim, rank * shard.size(pdim + 1))
            for G in grads:
                hyperball_update_(whole, G.clone(), full_bufs, cfg, 0.05)
                hyperball_update_(shard, G.chunk(world, dim=pdim + 1)[rank].clone(), bufs, cfg, 0.05, hooks=hooks)
            mine = whole.chunk(world, dim=pdim + 1)[rank]
            out[(pdim, method)] = (float((shard - mine).abs().max()), float((bufs.radius - full_bufs.radius).abs().max()))
    return out


@pytest.fixture(scope="module")
def tp_results():
    return harness.run(_tp_worker, 2)


@pytest.mark.distributed
def test_tp2_shards_match_one_process(tp_results):
    for rank in tp_results:
        assert "error" not in rank, rank.get("error")
        for key, (w_err, r_err) in rank.items():
            # the same products summed in another order: fp32 round-off
            assert w_err < 1e-6 and r_err < 1e-7, (key, w_err, r_err)
