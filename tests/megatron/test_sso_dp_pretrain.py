"""Atomic-module data-parallel sharding (``sso_dp_shard``) through Bridge's real pretrain() on CPU.

Dense Qwen3-style tiny model (24 atomic modules), 4 iterations, global batch 4, dropout 0:

* DP = 2 sharded against DP = 2 replicated (``sso_dp_shard=false``) and against DP = 1 (same
  global batch, so the same samples; two micro-batches instead of two ranks);
* each rank updated only its share, every rank's parameters are bit-identical after every
  iteration, every module is on its sphere;
* a torch_dist checkpoint written at DP = 2 resumes on one rank and continues the DP = 2 curve;
* a NaN that only rank 1 sees (written into the all-reduced gradient, a rank-local fault) makes
  both ranks skip that module (owned by rank 0) and nothing else; ranks stay bit-identical;
* TP = 2 x DP = 2 (4 ranks): same losses as TP = 1 x DP = 2, DP peers bit-identical;
* bf16 (fp32 main params): DP peers bit-identical, sharded.
"""

from __future__ import annotations

import math

import pytest

from test_cpu_mode import CUDA_FREE, NEEDS_MEGATRON  # noqa: E402  (same skip rules)

HOOK = "megatron_sso.testing.bridge_hooks:install_same_init"
NAN_HOOK = "megatron_sso.testing.dp_hooks:install_nan_on_one_rank"
PROBE = "megatron_sso.testing.dp_hooks:dp_probe"
NO_DROPOUT = ("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
ITERS = (1, 2, 3, 4)
MODULES = 24  # 2 layers x (4 q heads + 2 k + 2 v, proj, gate, up, fc2)
SAME = 1e-5
"""Sharded vs replicated vs DP = 1: the same math; only a module batched alone (B = 1) may round
differently (torch folds a batch of one into a 2-D product), a few ulp in the weights."""
RESUME = 1e-4
"""Resume at another DP size: the gradient of a global batch is summed over two micro-batches on
one rank instead of all-reduced over two ranks, which may reassociate fp32 sums (~1e-7 relative
per operation, amplified by a few Newton-Schulz iterations); 1e-4 is the TP = 1 vs TP = 2 bound
of test_sso_pretrain.py. Measured on CPU/gloo: 0 (two addends sum the same either way)."""
pytestmark = [CUDA_FREE, NEEDS_MEGATRON, pytest.mark.megatron, pytest.mark.distributed]


def _run(world_size=2, overrides=(), hook=HOOK, **spec):
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    spec.setdefault("train_iters", 4)
    return run_pretrain(TinyGPTSpec(optimizer="sso", lr=1e-2, overrides=NO_DROPOUT + tuple(overrides), **spec),
                        world_size=world_size, setup_hook=hook, probe=PROBE, timeout_s=300)


def _losses(run, iters=ITERS) -> list[float]:
    assert sorted(run.losses) == list(iters), run.losses
    values = [run.losses[i] for i in iters]
    assert all(math.isfinite(v) for v in values), values
    return values


def _check_peers(run, peers, sharded=True):
    """DP peers: bit-identical parameters after every iteration; modules on their spheres; each
    peer updated a share of the modules (all of them when not sharded)."""
    for group in peers:
        ranks = [run.ranks[r] for r in group]
        for it in sorted(ranks[0].probes):
            assert len({r.probes[it]["param_sha"] for r in ranks}) == 1, (group, it)
            owned = [r.probes[it]["stats"]["sso/dp_owned_matrices"] for r in ranks]
            total = ranks[0].probes[it]["stats"]["sso/num_matrices"]
            assert all(r.probes[it]["stats"]["sso/num_matrices"] == total for r in ranks)
            if sharded:
                assert sum(owned) == total and all(0 < o < total for o in owned), (it, owned, total)
            else:
                assert owned == [total] * len(ranks)
            for r in ranks:
                assert max(r.probes[it]["norm_errors"].values()) < 1e-3, r.probes[it]["norm_errors"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_dp2")
    run = _run(overrides=(f"checkpoint.save={ckpt}", "checkpoint.save_interval=2"))
    return run, ckpt


def test_sharded_matches_replicated_and_one_rank(sharded):
    run, _ = sharded
    values = _losses(run)
    assert values[-1] < values[0]
    _check_peers(run, [(0, 1)])
    stats = run.ranks[0].probes[4]["stats"]
    assert stats["sso/num_matrices"] == MODULES and stats["sso/dp_gather_bytes"] > 0
    assert stats["sso/msign_calls_per_matrix"] == 2.0 and stats["sso/skipped_nonfinite"] == 0
    replicated = _run(overrides=("optimizer.sso_dp_shard=false",))
    _check_peers(replicated, [(0, 1)], sharded=False)
    assert replicated.ranks[0].probes[4]["stats"]["sso/dp_gather_bytes"] == 0
    one = _run(world_size=1)
    for label, other in (("replicated", replicated), ("DP=1", one)):
        diff = max(abs(a - b) for a, b in zip(values, _losses(other)))
        print(f"sharded vs {label}: max |loss diff| = {diff:.3g}")
        assert diff <= SAME, (label, values, other.losses)
    # the per-kind stats are gathered: rank 0 reports every module, not only its own
    kinds = run.ranks[0].probes[4]["stats"]
    assert kinds["sso/qkv_q/update_rms"] > 0 and kinds["sso/linear_fc2/update_rms"] > 0


def test_dp2_checkpoint_resumes_on_one_rank(sharded):
    run, ckpt = sharded
    resumed = _run(world_size=1, overrides=(f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=2"))
    values = _losses(resumed, (3, 4))
    diff = max(abs(a - run.losses[i]) for a, i in zip(values, (3, 4)))
    print(f"DP=2 -> DP=1 resume: losses {values} vs {[run.losses[3], run.losses[4]]}, max |diff| = {diff:.3g}")
    assert diff <= RESUME
    # momentum, cached vectors and lambda came back: the first resumed solve is warm
    assert resumed.ranks[0].probes[3]["stats"]["sso/msign_calls_per_matrix"] == 2.0


def test_nan_seen_by_one_rank_is_skipped_by_all(sharded):
    from megatron_sso.testing.dp_hooks import NAN_ITERATION

    clean, _ = sharded
    run = _run(hook=NAN_HOOK)
    values = _losses(run)
    _check_peers(run, [(0, 1)])
    for rank in run.ranks:
        probes = rank.probes
        assert probes[NAN_ITERATION]["poisoned"] == probes[NAN_ITERATION]["watched_module"]
        for it in ITERS:  # only the poisoned module, only at that iteration
            assert probes[it]["stats"]["sso/skipped_nonfinite"] == (1 if it == NAN_ITERATION else 0), it
        # the poisoned module kept its weight through that step; it moved in the clean run
        assert probes[NAN_ITERATION]["watched_sha"] == probes[NAN_ITERATION - 1]["watched_sha"]
        ref = clean.ranks[rank.rank].probes
        assert ref[NAN_ITERATION]["watched_module"] == probes[NAN_ITERATION]["watched_module"]
        assert ref[NAN_ITERATION]["watched_sha"] != ref[NAN_ITERATION - 1]["watched_sha"]
    # the iteration before the NaN is the clean run's; afterwards the run goes on, finite
    assert values[:NAN_ITERATION] == [clean.losses[i] for i in ITERS[:NAN_ITERATION]]


def test_tensor_and_data_parallel_compose(sharded):
    run, _ = sharded
    both = _run(world_size=4, tensor_parallel=2)
    values = _losses(both)
    _check_peers(both, [(0, 2), (1, 3)])  # Megatron's order: TP ranks adjacent, DP peers 2 apart
    diff = max(abs(a - b) for a, b in zip(values, _losses(run)))
    print(f"TP=2 x DP=2 {values} vs TP=1 x DP=2 {run.losses}: max |loss diff| = {diff:.3g}, {both.wall_s:.0f} s")
    assert diff < 1e-4  # as test_sso_pretrain.py's TP=2 vs TP=1
    assert both.ranks[0].probes[4]["stats"]["sso/tp_gather_bytes"] > 0


def test_bf16_sharded_updates_fp32_main_params(sharded):
    """bf16: the sphere updates Megatron's fp32 main params (the atomic views are views of them)
    and the wrapper copies them to the bf16 model params on every rank."""
    fp32, _ = sharded
    run = _run(overrides=("mixed_precision=bf16_mixed",))
    values = _losses(run)
    _check_peers(run, [(0, 1)])
    diff = max(abs(a - b) for a, b in zip(values, _losses(fp32)))
    print(f"bf16 vs fp32 (both sharded): max |loss diff| = {diff:.3g}")
    assert 0 < diff < 1e-2  # bf16 really ran, and trains like fp32
