"""SPECTRA (SPEC §5): Signum and AdEMAMix against plain-loop float64 references, post-clipping
against float64 SVDs, pre-clipping, pass-through, checkpoints and input validation.

Tolerances: the base optimisers are the same arithmetic as the references up to operation
order, 1e-12 in float64. Clipped updates (fp32 clip): 1% per singular value and 1% relative
Frobenius against ``U f(S) V^T`` (the specification); measured 3e-7 / 3e-6 for soft and
2e-6 / 1e-6 for hard on update spectra spanning 1.8..11.7 around ``c = 5``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron_sso.optim.ademamix import AdEMAMix, AdEMAMixConfig, ademamix_alpha, ademamix_beta3
from megatron_sso.optim.signum import Signum
from megatron_sso.optim.spectra import (
    Spectra,
    SpectraConfig,
    pre_clip_gradients_,
    spectra_clip_update,
    spectra_param_groups,
)
from tests.reference.spectral_clip_reference import (
    coordinates_in_singular_basis,
    matrix_with_spectrum,
    soft_clip_scalar,
)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Small matrices: one thread avoids OpenMP synchronisation on the 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def grads_for(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


# --------------------------------------------------------------------------- plain-loop references


def signum_ref(w0, grads, lr, momentum, wd):
    """Signum, one Python float at a time (Bernstein et al. 2018 + decoupled decay)."""
    w, m = [float(x) for x in w0.flatten()], [0.0] * w0.numel()
    for g in grads:
        for i, gi in enumerate(g.flatten().tolist()):
            m[i] = momentum * m[i] + (1 - momentum) * gi
            sign = (m[i] > 0) - (m[i] < 0)
            w[i] = (1 - lr * wd) * w[i] - lr * sign
    return torch.tensor(w, dtype=torch.float64).view_as(w0)


def ademamix_ref(w0, grads, lr, b1, b2, b3, alpha, eps, wd, t_alpha, t_beta3):
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1 and the scheduler formulas), float by float."""
    n = w0.numel()
    w, m1, m2, nu = [float(x) for x in w0.flatten()], [0.0] * n, [0.0] * n, [0.0] * n
    for t, g in enumerate(grads, start=1):
        a = min(t * alpha / t_alpha, alpha)
        if t >= t_beta3:
            beta3 = b3
        elif b1 == 0.0:  # limit of the closed form as ln(b1) -> -inf
            beta3 = b3 ** (t_beta3 / t)
        else:
            r = t / t_beta3
            beta3 = min(math.exp(math.log(b1) * math.log(b3) / ((1 - r) * math.log(b3) + r * math.log(b1))), b3)
        for i, gi in enumerate(g.flatten().tolist()):
            m1[i] = b1 * m1[i] + (1 - b1) * gi
            m2[i] = beta3 * m2[i] + (1 - beta3) * gi
            nu[i] = b2 * nu[i] + (1 - b2) * gi * gi
            d = (m1[i] / (1 - b1**t) + a * m2[i]) / (math.sqrt(nu[i] / (1 - b2**t)) + eps)
            w[i] = w[i] - lr * (d + wd * w[i])
    return torch.tensor(w, dtype=torch.float64).view_as(w0)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_signum_matches_loop_reference(momentum):
    shapes = [(3, 4), (5,)]
    params = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) for s in shapes]
    grads = [grads_for(s, 5, 10 + i) for i, s in enumerate(shapes)]
    grads[0][0][:, 1] = 0.0  # a column whose first gradient is 0: sign(0) = 0 on step 1 (beta=0)
    ws = [p.clone().requires_grad_() for p in params]
    opt = Signum(ws, lr=0.01, momentum=momentum, weight_decay=0.1)
    for k in range(5):
        for w, g in zip(ws, grads):
            w.grad = g[k].clone()
        opt.step()
    for w, p, g in zip(ws, params, grads):
        ref = signum_ref(p, g, 0.01, momentum, 0.1)
        assert (w.detach() - ref).abs().max() <= 1e-14


@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_ademamix_matches_loop_reference(b1):
    p = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = grads_for((4, 3), 7, 20)
    hp = dict(beta1=b1, beta2=0.999, beta3=0.99, alpha=5.0, eps=1e-8, weight_decay=0.1,
              alpha_warmup=4, beta3_warmup=5)  # both warm-ups end inside the 7 steps
    w = p.clone().requires_grad_()
    opt = AdEMAMix([w], lr=0.01, **hp)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref = ademamix_ref(p, grads, 0.01, b1, 0.999, 0.99, 5.0, 1e-8, 0.1, 4, 5)
    assert (w.detach() - ref).abs().max() <= 1e-12


def test_ademamix_schedulers():
    cfg = AdEMAMixConfig(beta1=0.9, beta3=0.9999, alpha=8.0, alpha_warmup=100, beta3_warmup=100)
    assert ademamix_alpha(0, cfg) == 0.0 and ademamix_alpha(50, cfg) == 4.0 and ademamix_alpha(500, cfg) == 8.0
    assert ademamix_beta3(0, cfg) == pytest.approx(0.9, rel=1e-12)
    assert ademamix_beta3(100, cfg) == 0.9999
    half = [math.log(0.5) / math.log(ademamix_beta3(t, cfg)) for t in (0, 25, 50, 75, 100)]
    steps = [b - a for a, b in zip(half, half[1:])]
    assert max(steps) - min(steps) < 1e-6 * half[-1]  # linear in half-life
    assert ademamix_beta3(7, AdEMAMixConfig()) == 0.9999  # no warm-up: constant


# --------------------------------------------------------------------------- post-clipping


BASES = {
    "adamw": (lambda ps, wd: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd), {}),
    "signum": (lambda ps, wd: Signum(ps, lr=0.01, weight_decay=wd), {}),
    "ademamix": (lambda ps, wd: AdEMAMix(ps, lr=0.01, weight_decay=wd, alpha_warmup=5, beta3_warmup=5),
                 {"alpha_warmup": 5, "beta3_warmup": 5}),
}


def soft(s, c):
    return soft_clip_scalar(s, c)


def hard(s, c):
    return s.double().clamp_max(c)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("shape", [(48, 24), (24, 48)], ids=["tall", "wide"])
def test_post_clip_maps_singular_values_of_the_base_update(base, mode, shape):
    """Applied update = s f(sigma) on the base update's singular pairs (float64 SVD)."""
    make_base, extra = BASES[base]
    c, lr, wd = 5.0, 0.01, 0.1
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    base_opt = make_base([a], 0.0)  # no decay: W_before - W_after = lr D exactly
    opt = Spectra([b], lr=lr, base=base, clip=mode, c=c, weight_decay=wd, **extra)
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    f = soft if mode == "soft" else hard
    for g in grads_for(shape, 3, 30):
        a_prev, b_prev = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = g.clone(), g.clone()
        base_opt.step()
        opt.step()
        D = (a_prev - a.detach()) / lr
        applied = ((1 - lr * wd) * b_prev - b.detach()) / (lr * scale)
        sigma = torch.linalg.svdvals(D)
        assert sigma.max() > c > sigma.min()  # the clip is active on part of the spectrum only
        got = coordinates_in_singular_basis(applied, D)
        assert ((got - f(sigma, c)).abs() / f(sigma, c)).max() < 1e-2
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        ref = (U * f(S, c)) @ Vh
        assert (applied - ref).norm() / ref.norm() < 1e-2


def test_spectra_clip_update_uses_the_full_shape_for_the_scale():
    D = torch.randn(2, 8, 4)
    cfg = SpectraConfig(c=1.0)
    # s = sqrt(32/4) vs sqrt(8/4): a ratio of exactly 2, whatever D's own (8, 4) shape says
    assert torch.allclose(spectra_clip_update(D, cfg, shape=(32, 4)), 2.0 * spectra_clip_update(D, cfg, shape=(8, 4)))
    assert spectra_clip_update(D, SpectraConfig(clip="none")) is D


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_weights_stay_in_the_frank_wolfe_ball(mode):
    """Constant gradient, lr wd = 0.05: ||W||_2 approaches but never exceeds s c / wd."""
    shape, c, wd, lr = (32, 8), 1.0, 0.1, 0.5
    bound = math.sqrt(shape[0] / shape[1]) * c / wd  # 20
    w = torch.zeros(shape, requires_grad=True)
    opt = Spectra([w], lr=lr, clip=mode, c=c, weight_decay=wd)
    G = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    norms = []
    for _ in range(60):
        w.grad = G.clone()
        opt.step()
        norms.append(float(torch.linalg.matrix_norm(w.detach().double(), ord=2)))
    assert max(norms) <= bound * (1 + 1e-5)
    assert norms[-1] > 0.9 * bound


# --------------------------------------------------------------------------- pass-through


@pytest.mark.parametrize("base", sorted(BASES))
def test_1d_and_unclipped_groups_follow_the_base_optimizer(base):
    make_base, extra = BASES[base]
    gen = torch.Generator().manual_seed(5)
    bias, emb = torch.randn(7, dtype=torch.float64, generator=gen), torch.randn(6, 4, dtype=torch.float64, generator=gen)
    ref = [bias.clone().requires_grad_(), emb.clone().requires_grad_()]
    ours = [bias.clone().requires_grad_(), emb.clone().requires_grad_()]
    base_opt = make_base(ref, 0.1)
    opt = Spectra([{"params": [ours[0]]}, {"params": [ours[1]], "clip": "none"}], lr=0.01, base=base,
                  weight_decay=0.1, **extra)
    gb, ge = grads_for((7,), 4, 50), grads_for((6, 4), 4, 51)
    for k in range(4):
        for r, o, g in zip(ref, ours, (gb[k], ge[k])):
            r.grad, o.grad = g.clone(), g.clone()
        base_opt.step()
        opt.step()
    for r, o in zip(ref, ours):
        if base == "adamw":  # torch's AdamW: same math, different operation order
            assert (r - o).abs().max() <= 1e-12
        else:  # our own classes share the functional core: bit-identical
            assert torch.equal(r, o)
    assert opt.last_step_stats["num_matrices"] == 0 and opt.last_step_stats["num_unclipped"] == 2


def test_batched_equals_unbatched():
    ws = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runs = []
    for batched in (True, False):
        ps = [w.clone().requires_grad_() for w in ws]
        opt = Spectra(ps, lr=0.01, batched=batched)
        for k in range(2):
            for i, p in enumerate(ps):
                p.grad = grads_for((16, 8), 2, 60 + i)[k].float()
            opt.step()
        runs.append(ps)
    for x, y in zip(*runs):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- pre-clipping


def test_pre_clip_suppresses_a_spectral_spike():
    """One singular value 100x the rest (1.0 vs 0.01), c = 0.1: spike -> ~c, bulk ~unchanged."""
    spectrum = torch.full((16,), 0.01, dtype=torch.float64)
    spectrum[0] = 1.0
    G = matrix_with_spectrum(32, 16, spectrum, seed=7).float()
    p = torch.zeros(32, 16, requires_grad=True)
    p.grad = G.clone()
    assert pre_clip_gradients_([p], c=0.1) == 1
    got = coordinates_in_singular_basis(p.grad, G)
    target = soft_clip_scalar(torch.linalg.svdvals(G.double()), 0.1)
    assert ((got - target).abs() / target).max() < 1e-2
    assert got[0] < 0.1 and got[0] / got[1:].max() < 10.1  # spike ratio 100 -> 10.0


def test_spectra_pre_clip_is_off_by_default_and_skips_unclipped_groups():
    w, b, e = torch.randn(8, 4), torch.randn(8), torch.randn(10, 4)
    for t in (w, b, e):
        t.requires_grad_()
        t.grad = 10 * torch.randn_like(t)
    saved = [t.grad.clone() for t in (w, b, e)]
    def groups():  # fresh dicts: an optimizer fills its groups' defaults in place
        return [{"params": [w, b]}, {"params": [e], "clip": "none"}]

    assert Spectra(groups(), lr=0.01).pre_clip_gradients_() == 0
    assert all(torch.equal(t.grad, s) for t, s in zip((w, b, e), saved))
    assert Spectra(groups(), lr=0.01, pre_clip=True).pre_clip_gradients_() == 1
    assert torch.linalg.matrix_norm(w.grad, ord=2) < 0.1
    assert torch.equal(b.grad, saved[1]) and torch.equal(e.grad, saved[2])


# --------------------------------------------------------------------------- state, stats, groups


@pytest.mark.parametrize("base", sorted(BASES))
def test_state_dict_resume_is_exact(base):
    extra = BASES[base][1]
    shapes = [(12, 6), (6,)]
    grads = [grads_for(s, 6, 70 + i) for i, s in enumerate(shapes)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(8)) for s in shapes]

    def run(params, opt, ks):
        for k in ks:
            for p, g in zip(params, grads):
                p.grad = g[k].float()
            opt.step()

    ps = [t.clone().requires_grad_() for t in init]
    opt = Spectra(ps, lr=0.01, base=base, **extra)
    run(ps, opt, range(3))
    saved_params, saved_state = [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())
    run(ps, opt, range(3, 6))
    qs = [t.clone().requires_grad_() for t in saved_params]
    opt2 = Spectra(qs, lr=0.01, base=base, **extra)
    opt2.load_state_dict(saved_state)
    assert opt2.state_dict()["state"][0]["step"] == 3
    run(qs, opt2, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_stats_count_clipped_matrices_and_estimate_norms():
    small, big = torch.zeros(16, 16, requires_grad=True), torch.zeros(64, 16, requires_grad=True)
    opt = Spectra([small, big], base="signum", c=5.0, stats_power_iters=8)
    assert opt.last_step_stats == {}
    small.grad = torch.outer(torch.ones(16), torch.ones(16)) * torch.tensor([1.0] + [0.0] * 15)  # sign: one column
    big.grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
    opt.step()
    stats = opt.last_step_stats
    true_big = float(torch.linalg.matrix_norm(torch.sign(big.grad), ord=2))  # ~11.5
    assert stats["num_matrices"] == 2 and stats["num_clipped"] == 1  # ||D_small||_2 = 4 < c
    assert 0.9 * true_big <= stats["max_sigma_pre"] <= true_big * (1 + 1e-5)
    post_big = 2.0 * true_big / math.sqrt(1 + (true_big / 5.0) ** 2)  # s = sqrt(64/16)
    assert stats["mean_sigma_post"] == pytest.approx((post_big + 4.0 / math.sqrt(1 + 16 / 25)) / 2, rel=0.05)


def test_spectra_param_groups():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "fc": torch.nn.Linear(4, 4),
                                 "lm_head": torch.nn.Linear(4, 10, bias=False)})
    model["lm_head"].weight = model["emb"].weight  # tied: appears once, unclipped
    groups = spectra_param_groups(model, unclipped=["lm_head"])
    assert [len(g["params"]) for g in groups] == [2, 1] and groups[1]["clip"] == "none"
    assert groups[1]["params"][0] is model["emb"].weight
    groups = spectra_param_groups(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)), ["0"])
    assert [len(g["params"]) for g in groups] == [2, 2]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "5", True])
def test_bad_clip_level_is_a_value_error_naming_it(bad):
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"c must be a positive finite number, got " + repr(bad).replace("(", r"\(")):
        Spectra([p], c=bad)
    with pytest.raises(ValueError, match="pre_clip_c .*" + repr(bad).replace("(", r"\(")):
        SpectraConfig(pre_clip_c=bad)
    p.grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match="pre-clip c .*" + repr(bad).replace("(", r"\(")):
        pre_clip_gradients_([p], c=bad)


def test_bad_options_are_value_errors_naming_them():
    p = torch.zeros(3, 3, requires_grad=True)
    cases = [
        (lambda: Spectra([p], base="lion"), "'lion'"),
        (lambda: SpectraConfig(base="sgd"), "'sgd'"),
        (lambda: Spectra([p], clip="medium"), "'medium'"),
        (lambda: Spectra([p], clip_dtype="fp8"), "'fp8'"),
        (lambda: Spectra([p], base="signum", alpha=2.0), "'alpha'"),
        (lambda: Spectra([{"params": [p], "base": "signum"}]), "'signum'"),
        (lambda: Spectra([p], lr=0.0), "lr=0.0"),
        (lambda: Signum([p], momentum=1.0), "1.0"),
        (lambda: AdEMAMix([p], beta3=1.5), "1.5"),
        (lambda: AdEMAMix([p], alpha_warmup=0), "alpha_warmup .*0"),
        (lambda: spectra_clip_update(torch.ones(2, 2), SpectraConfig(clip="hard"), allreduce=lambda t: t,
                                     partition_dim=0), "hard"),
    ]
    for make, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            make()
