"""optimizer=sso through Megatron-Bridge's real pretrain() loop on CPU (gloo ranks).

Dense (Qwen3-style: GQA, QK-norm, SwiGLU, RoPE), MoE (4 experts, top-2, shared expert,
allgather dispatcher) and a deep-narrow DeepNet-style model with PP=2; TP=2 against TP=1;
torch_dist save and exact resume. Ranks start with Megatron's CPU initialisation
(``testing_hooks.install_same_init``) so that TP sizes start from the same weights; dropout 0.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest

from test_cpu_mode import CUDA_FREE, NEEDS_MEGATRON  # noqa: E402  (same skip rules)

HOOK = "megatron_sso.testing.bridge_hooks:install_same_init"
PROBE = "megatron_sso.testing.bridge_hooks:layer_check_probe"
NO_DROPOUT = ("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
MOE = ("model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_intermediate_size=32", "model.moe_token_dispatcher_type=allgather",
       "model.moe_grouped_gemm=false", "model.moe_aux_loss_coeff=0.01")
pytestmark = [CUDA_FREE, NEEDS_MEGATRON, pytest.mark.megatron, pytest.mark.distributed]
SPHERE_WEIGHTS = re.compile(r"(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight\d*$")
"""The hidden matrices (dense, shared-expert, expert; TEGroupedMLP's weight<i> too): written out
here from Megatron's parameter names, apart from the routing table the product uses."""


def _run(world_size=1, overrides=(), **spec):
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    spec.setdefault("train_iters", 4)
    return run_pretrain(TinyGPTSpec(optimizer="sso", lr=1e-2, overrides=NO_DROPOUT + tuple(overrides), **spec),
                        world_size=world_size, setup_hook=HOOK, probe=PROBE, timeout_s=900)


def _check_holders(run) -> None:
    """Every hidden matrix is held by our MegatronSphere and by nothing else; every other parameter
    (embeddings, output layer, norms, router) by Megatron's Adam only -- on every rank."""
    for rank in run.ranks:
        holders = rank.probes[1]["holders"]
        assert holders, rank.rank
        sphere = {n for n in holders if SPHERE_WEIGHTS.search(n)}
        assert sphere, sorted(holders)
        def held_right(name, held):
            if name in sphere:
                return held == ["MegatronSphere"]
            return len(held) == 1 and held[0] in ("Adam", "AdamW")
        wrong = {n: h for n, h in holders.items() if not held_right(n, h)}
        assert not wrong, wrong


def _check(run, iters=(1, 2, 3, 4), decreasing=True) -> list[float]:
    losses = run.losses
    assert sorted(losses) == list(iters), losses
    values = [losses[i] for i in iters]
    assert all(math.isfinite(v) for v in values), values
    assert not decreasing or values[-1] < values[0], f"loss did not decrease: {values}"
    for rank in run.ranks:
        assert not rank.skipped_iterations, rank.skipped_iterations
        for step, probe in rank.probes.items():
            # every stored sphere module is on its sphere (exact SVD), every step, every rank;
            # the logged norm error (the monitor's own power iteration) agrees with it
            exact = probe["norm_errors"]
            assert exact and max(exact.values()) < 1e-3, (step, exact)
            stats = probe["stats"]
            for kind, err in exact.items():
                assert abs(stats[f"sso/{kind}/norm_error"] - err) < 1e-4, (step, kind, stats)
            assert stats["sso/skipped_nonfinite"] == 0, stats
    return values


def _tp_consistent(run):
    """The TP ranks ran the same solves: equal msign counts and cold restarts on every rank (a
    restart decided on one rank only would cost it 8 msigns per module instead of 2). The other
    statistics differ legitimately: each rank owns other QKV heads."""
    keys = ("sso/msign_calls", "sso/cache_cold_restarts")
    for it in run.ranks[0].probes:
        rows = [tuple(r.probes[it]["stats"][k] for k in keys) for r in run.ranks]
        assert len(set(rows)) == 1, (it, rows)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    run = _run(overrides=(f"checkpoint.save={ckpt}", "checkpoint.save_interval=2", "optimizer.sso_lambda_tol=1e-4"))
    return run, ckpt


def test_dense_qwen3_sso(dense):
    run, _ = dense
    _check(run)
    _check_holders(run)
    probe = run.ranks[0].probes
    assert probe[1]["lambda_tol"] == 1e-4  # a Bridge override reached the SphereConfig
    kinds = set(probe[4]["norm_errors"])
    assert kinds == {"qkv_q", "qkv_k", "qkv_v", "linear_proj", "gate", "up", "linear_fc2"}, kinds
    assert probe[1]["stats"]["sso/msign_calls_per_matrix"] == 8.0  # cold solve on step 1: 4 + 4
    assert probe[2]["stats"]["sso/msign_calls_per_matrix"] == 2.0  # warm afterwards
    # the cold solve's best evaluated msign is within the (overridden) tolerance
    assert probe[1]["stats"]["sso/max_abs_h"] <= 1e-4 and probe[1]["stats"]["sso/lambda_above_tol"] == 0
    # the real Megatron layer: noise on one atomic module's view moves exactly one head
    # (4 q heads over 2 groups, then k and v per group: order q0 q1 k v | q2 q3 k v)
    expect = [[[0], [], []], [[1], [], []], [[], [0], []], [[], [], [0]],
              [[2], [], []], [[3], [], []], [[], [1], []], [[], [], [1]]]
    assert probe[1]["qkv_changed_heads"] == expect
    assert probe[1]["glu_views_match"]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_tp2")
    return _run(world_size=2, tensor_parallel=2,
                overrides=(f"checkpoint.save={ckpt}", "checkpoint.save_interval=2")), ckpt


def test_tensor_parallel_matches_one_rank(dense, tp2):
    run, _ = dense
    tp2, _ = tp2
    values = _check(tp2)
    _tp_consistent(tp2)
    single = [run.losses[i] for i in (1, 2, 3, 4)]
    diff = max(abs(a - b) for a, b in zip(values, single))
    print(f"TP=1 {single}\nTP=2 {values}\nmax |diff| = {diff:.3g}")
    assert diff < 1e-4
    stats = tp2.ranks[0].probes[4]["stats"]
    assert stats["sso/tp_gather_bytes"] > 0  # row-parallel proj/fc2 and the TP-split fc1 halves


def _resume_at_other_tp(ckpt, world_size, tp):
    """Steps 3-4 from a step-2 checkpoint written at another TP size: every module on its
    sphere (exact SVD) to RESUMED_NORM, TP ranks consistent, the gate/up caches restarted when
    their rows moved between ranks."""
    run = _run(world_size=world_size, tensor_parallel=tp,
               overrides=(f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2"))
    _check(run, iters=(3, 4), decreasing=False)
    _tp_consistent(run)
    for rank in run.ranks:
        for step, probe in rank.probes.items():
            assert max(probe["norm_errors"].values()) < RESUMED_NORM, (step, probe["norm_errors"])
    return run


RESUMED_NORM = 1e-5
"""Bound on exact ``| ||W||_2 / R - 1 |`` after a resume at another TP size. Measured: at most
2.3e-6 (fp32 round-off, like an uninterrupted run); without the cache check (TP 1 -> 2, rank 1's
zero gate/up blocks, sigma = 0, no retraction of its rows) gate 6.1e-4 and 3.7e-4, up 5.4e-4 at
steps 3 and 4 of this schedule (lr 2.7e-3 there), growing with lr and steps (issue 13: 1.3e-2 after
15 steps): the 1e-3 of the other tests would not see it."""


def test_tp1_checkpoint_resumes_at_tp2(dense):
    """TP 1 -> 2: rank 1's half of fc1 holds rows that were never its cache (zeros). Before the
    cache check: ||gate||_2 / R - 1 = 6.1e-4 after one resumed step (see RESUMED_NORM); now every
    module < 1e-5 and the 4 gate/up modules (2 layers) restart cold."""
    _, ckpt = dense
    run = _resume_at_other_tp(ckpt, 2, 2)
    stats = run.ranks[0].probes[3]["stats"]
    print("TP1->TP2 resume:", {k: v for k, v in stats.items() if "norm_error" in k or "restart" in k})
    assert stats["sso/cache_cold_restarts"] == 4
    assert run.ranks[0].probes[4]["stats"]["sso/cache_cold_restarts"] == 0  # once, after the load


def test_tp2_checkpoint_resumes_at_tp1(tp2):
    """TP 2 -> 1: rank 0's rows of each fc1 half come first, so its cache is where TP 1 reads
    it: nothing needs to restart (the check does not fire on a usable cache)."""
    _, ckpt = tp2
    run = _resume_at_other_tp(ckpt, 1, 1)
    stats = run.ranks[0].probes[3]["stats"]
    print("TP2->TP1 resume:", {k: v for k, v in stats.items() if "norm_error" in k or "restart" in k})
    assert stats["sso/cache_cold_restarts"] == 0


def test_checkpoint_resume_is_exact(dense):
    run, ckpt = dense
    resumed = _run(overrides=(f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2"))
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {3: run.losses[3], 4: run.losses[4]}
    # momentum, cached singular vectors and lambda came back: the solve is warm at once
    assert resumed.ranks[0].probes[3]["stats"]["sso/msign_calls_per_matrix"] == 2.0


def test_moe_sso_with_spectral_mup_init():
    run = _run(overrides=MOE + ("optimizer.sso_mup_init=true",))
    _check(run)
    _check_holders(run)
    first = run.ranks[0].probes[1]["stats"]  # sigma/R of the weights step 1 started from
    init_errors = {k: v for k, v in first.items() if k.endswith("/start_norm_error")}
    print("step-1 norm errors after spectral-muP init:", init_errors)
    assert max(init_errors.values()) < 1e-3, init_errors
    kinds = set(run.ranks[0].probes[4]["norm_errors"])
    assert {"expert_gate", "expert_up", "expert_linear_fc2", "shared_gate", "shared_up",
            "shared_linear_fc2"} <= kinds, kinds
    assert not any("router" in k for k in kinds)  # the router stays with AdamW by default


def test_deep_narrow_pipeline_parallel():
    # 6 layers of width 32 (head dim 16, one KV group); 6 steps: on random mock tokens the loss
    # of this deep model moves up on step 3 before it falls (also with AdamW-scale noise)
    run = _run(world_size=2, pipeline_parallel=2, num_layers=6, hidden_size=32, ffn_hidden_size=64,
               num_attention_heads=2, num_query_groups=1, train_iters=6)
    _check(run, iters=(1, 2, 3, 4, 5, 6))
    assert all(r.probes[6]["norm_errors"] for r in run.ranks)  # both stages own sphere modules


def test_distributed_optimizer_is_refused():
    from megatron_sso.mcore.optimizers.factory import get_sphere_megatron_optimizer

    config = SimpleNamespace(optimizer="sso", use_distributed_optimizer=True, fp16=False)
    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        get_sphere_megatron_optimizer(config, [])
