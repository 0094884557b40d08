"""``optimizer=muon_hyperball`` in Megatron: MegatronSphere on one process (param-shaped state with
the radius row), and Megatron-Bridge's real pretrain() on CPU -- loss falls, every atomic module at
its Frobenius radius ``c ||W_0||_F`` on every step, torch_dist resume exact, TP=2 equal to TP=1."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from test_cpu_mode import CUDA_FREE, NEEDS_MEGATRON  # noqa: E402  (same skip rules)

from megatron_sso.mcore.observe.sphere_logging import exact_norm_errors, sphere_stats
from megatron_sso.mcore.optimizers.config import sphere_config_from
from megatron_sso.mcore.optimizers.layouts import param_layout
from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR, MegatronSphere
from megatron_sso.optim.config import SphereConfig

CFG = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=16, hidden_size=32,
                      ffn_hidden_size=48, gated_linear_unit=True)
HOOK = "megatron_sso.testing.bridge_hooks:install_same_init"
PROBE = "megatron_sso.mcore.observe.sphere_logging:probe"
NO_DROPOUT = ("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
KINDS = {"qkv_q", "qkv_k", "qkv_v", "linear_proj", "gate", "up", "linear_fc2"}


def _chain(opt):
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)])


def _norm_errors(stats: dict) -> dict:
    """``{kind: value}`` of the per-kind ``sso/<kind>/...norm_error`` stats (step-start weights)."""
    return {k.split("/")[1]: v for k, v in stats.items() if k.endswith("norm_error")}


def test_megatron_name_selects_hyperball_mode():
    cfg = sphere_config_from(SimpleNamespace(optimizer="muon_hyperball", sso_radius_scaler=2.0))
    assert cfg.mode == "hyperball" and cfg.on_hyperball and not cfg.on_sphere and cfg.radius_scaler == 2.0


def test_megatron_sphere_hyperball_state_is_param_shaped_with_the_radius_row():
    torch.manual_seed(0)
    qkv = torch.nn.Parameter(torch.randn(2 * 4 * 16, 32) * 0.02)
    fc1 = torch.nn.Parameter(torch.randn(96, 32) * 0.02)
    params = [qkv, fc1]
    for name, p in (("l.self_attention.linear_qkv.weight", qkv), ("l.mlp.linear_fc1.weight", fc1)):
        setattr(p, LAYOUT_ATTR, param_layout(name, p, CFG, 1))
    initial = {(id(p), i): float(mod.view(p.data).norm()) for p in params
               for i, mod in enumerate(getattr(p, LAYOUT_ATTR).modules)}
    # weight_decay in the group must not reach the hyperball step (the retraction would undo it)
    opt = MegatronSphere([{"params": params, "lr": 0.05, "weight_decay": 0.1}],
                         SphereConfig(mode="hyperball", radius_scaler=1.5))
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        errors = _norm_errors(sphere_stats(_chain(opt)))
        first = step == 0  # step 1 started at ||W_0|| = R / 1.5
        assert set(errors) == {"qkv_q", "qkv_k", "qkv_v", "gate", "up"}
        assert all(v == pytest.approx(1 - 1 / 1.5 if first else 0, abs=1e-6) for v in errors.values()), errors
    for p in params:
        state = opt.state[p]
        assert set(state) == {"momentum_buffer", "sphere_cache", "step"}
        assert state["sphere_cache"].shape == p.shape == state["momentum_buffer"].shape
        for i, mod in enumerate(getattr(p, LAYOUT_ATTR).modules):
            cache = mod.view(state["sphere_cache"])
            R = 1.5 * initial[(id(p), i)]
            assert torch.all(cache[0] == cache[0, 0]) and float(cache[0, 0]) == pytest.approx(R, rel=1e-6)
            assert not cache[1:].any()
            assert float(mod.view(p.data).double().norm()) == pytest.approx(R, rel=1e-6)
    errors = exact_norm_errors(_chain(opt))
    assert set(errors) == {"qkv_q", "qkv_k", "qkv_v", "gate", "up"} and max(errors.values()) < 1e-6


def _run(world_size=1, overrides=(), **spec):
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    spec.setdefault("train_iters", 4)
    return run_pretrain(TinyGPTSpec(optimizer="muon_hyperball", lr=0.05, overrides=NO_DROPOUT + tuple(overrides),
                                    **spec), world_size=world_size, setup_hook=HOOK, probe=PROBE, timeout_s=240)


def _check(run, iters=(1, 2, 3, 4)) -> list[float]:
    assert sorted(run.losses) == list(iters), run.losses
    values = [run.losses[i] for i in iters]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], f"loss did not decrease: {values}"
    for rank in run.ranks:
        assert not rank.skipped_iterations, rank.skipped_iterations
        for step, probe in rank.probes.items():
            # every stored atomic module at its Frobenius radius (float64 norm against the state's R)
            assert set(probe["norm_errors"]) == KINDS and max(probe["norm_errors"].values()) < 1e-6, (step, probe)
            assert probe["stats"]["sso/skipped_nonfinite"] == 0
    return values


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    run = _run(overrides=(f"checkpoint.save={ckpt}", "checkpoint.save_interval=2", "optimizer.sso_radius_scaler=2.0"))
    return run, ckpt


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_run_stays_on_the_frobenius_ball(dense):
    run, _ = dense
    _check(run)
    errors = _norm_errors(run.ranks[0].probes[1]["stats"])  # step 1 started at ||W_0||_F = R / c
    assert set(errors) == KINDS and all(v == pytest.approx(0.5, abs=1e-6) for v in errors.values()), errors
    assert max(_norm_errors(run.ranks[0].probes[4]["stats"]).values()) < 1e-6


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_resume_is_exact(dense):
    run, ckpt = dense
    resumed = _run(overrides=(f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2", "optimizer.sso_radius_scaler=2.0"))
    assert resumed.losses == {3: run.losses[3], 4: run.losses[4]}
    _check(resumed, iters=(3, 4))
    # the radii came back: a lost radius (0) would be re-read as c ||W||_F = 2R on step 3, whose
    # start weights would then sit at ||W||_F / R = 0.5
    assert max(_norm_errors(resumed.ranks[0].probes[3]["stats"]).values()) < 1e-6


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_tp2_matches_tp1(dense):
    run, _ = dense
    tp2 = _run(world_size=2, tensor_parallel=2, overrides=("optimizer.sso_radius_scaler=2.0",))
    values = _check(tp2)
    single = [run.losses[i] for i in (1, 2, 3, 4)]
    diff = max(abs(a - b) for a, b in zip(values, single))
    print(f"TP=1 {single}\nTP=2 {values}\nmax |diff| = {diff:.3g}")
    assert diff < 1e-4
    assert tp2.ranks[0].probes[4]["stats"]["sso/tp_gather_bytes"] > 0


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_dp2_sharded_matches_one_rank(dense):
    # DP = 2 with sso_dp_shard: each module updated by one owner, weight, momentum and the radius row
    # copied to the other rank; same global batch, so the curve is the single rank's
    run, _ = dense
    dp2 = _run(world_size=2, overrides=("optimizer.sso_radius_scaler=2.0",))
    values = _check(dp2)
    single = [run.losses[i] for i in (1, 2, 3, 4)]
    assert max(abs(a - b) for a, b in zip(values, single)) < 1e-4, (values, single)
    assert all(r.probes[4]["stats"]["sso/dp_owned_matrices"] < r.probes[4]["stats"]["sso/num_matrices"]
               for r in dp2.ranks)  # the work was split
