"""SPECTRA (``optimizer: adam | signum | ademamix`` + ``spectra_*``) through Megatron-Bridge's real
pretrain() loop on CPU (gloo ranks), on the tiny Qwen3-style model (GQA, QK-norm, SwiGLU).

The probe (``spectra_logging.update_probe``) measures by exact SVD, independently of the
optimizer's own statistics, the spectral norm of every atomic module's applied update per unit
lr against its bound ``c s``, and the pre-clipped gradients the step used. Ranks start from
Megatron's CPU initialisation (``testing_hooks.install_same_init``) so that runs and TP sizes
start from the same weights; dropout 0, so save/resume can be compared exactly.
"""

from __future__ import annotations

import math

import pytest

from test_cpu_mode import CUDA_FREE, NEEDS_MEGATRON  # noqa: E402  (same skip rules)

HOOK = "megatron_sso.testing.bridge_hooks:install_same_init"
PROBE = "megatron_sso.mcore.observe.spectra_logging:update_probe"
NO_DROPOUT = ("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
MOE = ("model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_intermediate_size=32", "model.moe_token_dispatcher_type=allgather",
       "model.moe_grouped_gemm=false", "model.moe_aux_loss_coeff=0.01")
KINDS = {"qkv_q", "qkv_k", "qkv_v", "linear_proj", "gate", "up", "linear_fc2"}
ROUND_OFF = 1e-4
"""Slack on ``||dW||_2 / (c s) <= 1``: the probe recovers the update as ``(W_t - (1 - lr wd)
W_{t-1}) / lr`` from fp32 weights (measured excess of the exact hard clip: 1.7e-6)."""
pytestmark = [CUDA_FREE, NEEDS_MEGATRON, pytest.mark.megatron, pytest.mark.distributed]


def _run(optimizer="adam", world_size=1, overrides=(), **spec):
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    spec.setdefault("train_iters", 4)
    spec.setdefault("lr", 1e-2)
    return run_pretrain(TinyGPTSpec(optimizer=optimizer, overrides=NO_DROPOUT + tuple(overrides), **spec),
                        world_size=world_size, setup_hook=HOOK, probe=PROBE, timeout_s=240)


def _check(run, iters=(1, 2, 3, 4), low=0.9, kinds=KINDS) -> list[float]:
    """Loss finite and falling; every clipped module's update within its bound (and, for
    ``low > 0``, the clip binding: ratio above ``low``); returns the losses."""
    losses = run.losses
    assert sorted(losses) == list(iters), losses
    values = [losses[i] for i in iters]
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0], f"loss did not decrease: {values}"
    for rank in run.ranks:
        assert not rank.skipped_iterations, rank.skipped_iterations
        for step in iters[1:]:
            ratios = rank.probes[step]["update_ratio"]
            assert set(ratios) == kinds, (step, ratios)
            assert max(ratios.values()) <= 1 + ROUND_OFF, (step, ratios)
            assert min(ratios.values()) > low, (step, ratios)
    return values


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    run = _run(overrides=("optimizer.spectra_post_clip=1.0", f"checkpoint.save={ckpt}", "checkpoint.save_interval=2"))
    return run, ckpt


def test_adamw_post_clip_bounds_every_atomic_update(dense):
    run, _ = dense
    values = _check(run)
    print("AdamW + soft post-clip c=1:", values)
    stats = run.ranks[0].probes[4]["stats"]
    # 8 per-head QKV modules, proj, gate, up, fc2 per layer, 2 layers; Adam's direction has
    # ||D||_2 ~ 10-30 on these shapes, so every module is clipped
    assert stats["spectra/num_matrices"] == 24 and stats["spectra/num_clipped"] == 24, stats
    assert stats["spectra/pre_clipped"] == 0 and stats["spectra/tp_sharded"] == 0


def test_checkpoint_resume_is_exact(dense):
    run, ckpt = dense
    resumed = _run(overrides=("optimizer.spectra_post_clip=1.0", f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2"))
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {3: run.losses[3], 4: run.losses[4]}


def test_tensor_parallel_matches_one_rank(dense):
    run, _ = dense
    tp2 = _run(world_size=2, tensor_parallel=2, overrides=("optimizer.spectra_post_clip=1.0",))
    values = _check(tp2)
    single = [run.losses[i] for i in (1, 2, 3, 4)]
    diff = max(abs(a - b) for a, b in zip(values, single))
    print(f"TP=1 {single}\nTP=2 {values}\nmax |diff| = {diff:.3g}")
    assert diff < 1e-4
    # per layer proj, fc2, gate, up are TP shards (the QKV heads are whole on their rank): soft
    # clip with one Gram all-reduce per batch, nothing gathered
    stats = tp2.ranks[0].probes[4]["stats"]
    assert stats["spectra/tp_sharded"] == 8 and stats["spectra/num_matrices"] == 8 + 8, stats
    assert stats["spectra/tp_gather_bytes"] == 0


def test_signum_hard_clip_with_pre_clip_before_norm_clipping(dense):
    run = _run("signum", lr=3e-3, overrides=("optimizer.spectra_post_clip=5.0", "optimizer.spectra_mode=hard",
                                              "optimizer.spectra_pre_clip=0.1"))
    _check(run, low=1 - ROUND_OFF)  # the hard clip lands exactly on c s (Signum: ||D||_2 >> 5)
    rank = run.ranks[0]
    for step, probe in rank.probes.items():
        norm = rank.grad_norms[step]  # Megatron's global norm, of the pre-clipped gradients
        shrink = min(1.0, 1.0 / norm)  # clip_grad = 1.0 then scaled them all
        # the gradients the step used: norm-clipped after the pre-clip ...
        assert probe["grad_norm_now"] == pytest.approx(norm * shrink, rel=1e-5), (step, probe)
        # ... and every 2-D module inside the pre-clip ball, shrunk by the norm clipping
        assert set(probe["grad_ratio"]) == KINDS
        assert max(probe["grad_ratio"].values()) <= shrink * (1 + ROUND_OFF), (step, shrink, probe)
        assert probe["stats"]["spectra/pre_clipped"] == 24
    # step 1 starts from the same weights and batch as the AdamW run: the norm Megatron clipped
    # with is that of the pre-clipped gradients, hence smaller
    assert rank.grad_norms[1] < dense[0].ranks[0].grad_norms[1] - 1e-3


def test_ademamix_post_clip_on_moe():
    """Routed experts (one atomic module each, gate/up apart) and the shared expert are clipped;
    the router stays with Megatron's Adam."""
    run = _run("ademamix", overrides=MOE + ("optimizer.spectra_post_clip=1.0", "optimizer.spectra_ademamix_alpha=5.0",
                                            "optimizer.spectra_ademamix_alpha_warmup=4"))
    moe_kinds = {"qkv_q", "qkv_k", "qkv_v", "linear_proj", "expert_gate", "expert_up", "expert_linear_fc2",
                 "shared_gate", "shared_up", "shared_linear_fc2"}
    _check(run, kinds=moe_kinds)
