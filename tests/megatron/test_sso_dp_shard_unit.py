"""MegatronSphere's atomic-module DP sharding on 4 gloo processes (TP = 2 x DP = 2), no Bridge.

Megatron-shaped parameters (a column-parallel fused QKV split per head, a TP-split SwiGLU fc1,
a row-parallel proj) start from one full set of matrices and receive the same full gradients on
every DP rank (what DDP's all-reduce hands the optimizer). Checked against one process holding
the full matrices (TP = DP = 1): sharded and replicated compute give the same trajectory
(to 1e-5); DP peers are bit-identical after every step (weights, momentum, cache); each DP rank
updated only its share, with one plan on every rank; a NaN seen by one rank only (after the
all-reduce) skips that module on every rank, although another rank owns it; results sent in
several all-gather rounds are the same; the stats describe every module on every rank.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.distributed import harness

CFG = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=16, hidden_size=32,
                      ffn_hidden_size=48, gated_linear_unit=True)
SHAPES = {"qkv": (128, 32), "fc1": (96, 32), "proj": (32, 64)}
NAMES = {"qkv": "l.self_attention.linear_qkv.weight", "fc1": "l.mlp.linear_fc1.weight",
         "proj": "l.self_attention.linear_proj.weight"}
STEPS = 3
NAN_STEP = 1
TOL = 1e-5


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) / s[1] ** 0.5 for k, s in SHAPES.items()}


def _shard(full: dict[str, torch.Tensor], tp: int, r: int) -> dict[str, torch.Tensor]:
    """Megatron's TP shards: QKV rows by query group, fc1 [gate_r; up_r], proj columns."""
    if tp == 1:
        return {k: v.clone() for k, v in full.items()}
    qkv = full["qkv"].chunk(tp, 0)[r]
    gate, up = full["fc1"].chunk(2, 0)
    fc1 = torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]])
    return {"qkv": qkv.clone(), "fc1": fc1, "proj": full["proj"].chunk(tp, 1)[r].clone()}


def _params(tp: int, r: int) -> list[torch.nn.Parameter]:
    from megatron_sso.mcore.optimizers.layouts import param_layout
    from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR

    out = []
    for key, value in _shard(_full(0), tp, r).items():
        p = torch.nn.Parameter(value)
        if key == "proj":
            p.tensor_model_parallel, p.partition_dim = True, 1
        setattr(p, LAYOUT_ATTR, param_layout(NAMES[key], p, CFG, tp))
        out.append(p)
    return out


def _train(params, opt, tp: int, r: int, nan_rank: int = -1) -> dict:
    from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR

    weights, stats = [], []
    for step in range(STEPS):
        for p, g in zip(params, _shard(_full(100 + step), tp, r).values()):
            p.grad = g
        if step == NAN_STEP and dist.is_initialized() and dist.get_rank() == nan_rank:
            getattr(params[0], LAYOUT_ATTR).modules[0].view(params[0].grad)[0, 0] = float("nan")
        opt.step()
        weights.append([p.detach().clone() for p in params])
        stats.append(opt.last_step_stats)
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    return {"weights": weights, "stats": stats, "state": state, "kinds": opt.kind_stats()}


def _distributed(rank: int, world: int) -> dict:
    from megatron_sso.mcore import dp_shard
    from megatron_sso.mcore.optimizers.sphere_optimizer import MegatronSphere
    from megatron_sso.optim.config import SphereConfig

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, dp = tp_groups[rank // 2], dp_groups[rank % 2]
    out = {}
    # "nan": global rank 2 (DP rank 1, TP rank 0) alone sees a NaN in head q0 of its QKV;
    # "rounds": the owners' results sent in several all-gathers (a 4 KiB budget per round)
    default_budget = dp_shard.GATHER_BUDGET_BYTES
    # "muon*": Muon (no sphere cache to send; decoupled weight decay from the group)
    for label, shard, nan_rank in (("shard", True, -1), ("replicated", False, -1), ("nan", True, 2),
                                   ("rounds", True, -1), ("muon", True, -1), ("muon_replicated", False, -1)):
        dp_shard.GATHER_BUDGET_BYTES = 4096 if label == "rounds" else default_budget
        params = _params(2, rank % 2)
        mode = "muon" if label.startswith("muon") else "sso"
        opt = MegatronSphere([{"params": params, "lr": 0.05, "weight_decay": 0.1}], SphereConfig(mode=mode),
                             {"dense": tp}, {"dense": dp}, dp_shard=shard)
        out[label] = _train(params, opt, 2, rank % 2, nan_rank)
        out[label]["owner"] = list(opt._domains[0].owner)
        out[label]["rounds"] = len(opt._domains[0].rounds)
    return out


def _single(rank: int, world: int) -> dict:
    from megatron_sso.mcore.optimizers.sphere_optimizer import MegatronSphere
    from megatron_sso.optim.config import SphereConfig

    params = _params(1, 0)
    opt = MegatronSphere([{"params": params, "lr": 0.05, "weight_decay": 0.0}], SphereConfig())
    return _train(params, opt, 1, 0)


@pytest.fixture(scope="module")
def results():
    return harness.run(_distributed, 4), _single(0, 1)  # the reference needs no process group


def test_sharded_matches_replicated_and_one_process(results):
    ranks, single = results
    for rank, res in enumerate(ranks):
        for step in range(STEPS):
            ref = _shard(dict(zip(SHAPES, single["weights"][step])), 2, rank % 2)
            for a, b, key in zip(res["shard"]["weights"][step], res["replicated"]["weights"][step], SHAPES):
                # same math; a module batched alone (B = 1) may round differently (torch folds
                # a batch of one into a 2-D product), hence a tolerance, not bit equality
                assert (a - b).abs().max() < TOL, (rank, step, key)
                assert (a - ref[key]).abs().max() < TOL, (rank, step, key)


def test_results_sent_in_several_rounds_are_the_same(results):
    ranks, _ = results
    for res in ranks:
        assert res["shard"]["rounds"] == 1 and res["rounds"]["rounds"] > 1
        for step in range(STEPS):
            assert all(torch.equal(a, b) for a, b in zip(res["shard"]["weights"][step], res["rounds"]["weights"][step]))


def test_muon_sharded_matches_replicated(results):
    ranks, _ = results
    for res in ranks:
        assert "sphere_cache" not in res["muon"]["state"][0]
        assert 0 < res["muon"]["stats"][-1]["dp_owned_matrices"] < res["muon"]["stats"][-1]["num_matrices"]
        for step in range(STEPS):
            for a, b in zip(res["muon"]["weights"][step], res["muon_replicated"]["weights"][step]):
                assert (a - b).abs().max() < TOL


@pytest.mark.parametrize("label", ["shard", "replicated", "nan", "rounds", "muon"])
def test_dp_peers_bit_identical(results, label):
    ranks, _ = results
    for a, b in ((ranks[0], ranks[2]), (ranks[1], ranks[3])):  # same TP rank, other DP rank
        for step in range(STEPS):
            assert all(torch.equal(x, y) for x, y in zip(a[label]["weights"][step], b[label]["weights"][step]))
        for sa, sb in zip(a[label]["state"], b[label]["state"]):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_each_dp_rank_updates_its_share(results):
    ranks, single = results
    total = 4 + 2 + 1  # per TP rank: one query group (2 q, k, v), gate and up halves, proj
    for res in ranks:
        stats = res["shard"]["stats"][-1]
        assert stats["num_matrices"] == total and res["replicated"]["stats"][-1]["num_matrices"] == total
        assert 0 < stats["dp_owned_matrices"] < total
        assert res["replicated"]["stats"][-1]["dp_owned_matrices"] == total
        assert stats["dp_gather_bytes"] > 0 and res["replicated"]["stats"][-1]["dp_gather_bytes"] == 0
        assert stats["msign_calls"] == res["replicated"]["stats"][-1]["msign_calls"]
        # same statistics; a module alone in its batch may differ by an ulp (batch-of-one matmul)
        assert res["shard"]["kinds"].keys() == res["replicated"]["kinds"].keys()
        for kind, got in res["shard"]["kinds"].items():
            want = res["replicated"]["kinds"][kind]
            assert got["modules"] == want["modules"]
            assert got["update_rms"] == pytest.approx(want["update_rms"], rel=1e-5)
            # (max_norm_error is not compared: the optimizer's own Ritz figure, ~1e-7 by construction)
    for a, b in ((ranks[0], ranks[2]), (ranks[1], ranks[3])):
        assert a["shard"]["owner"] == b["shard"]["owner"]  # one plan on every rank
        assert a["shard"]["stats"][-1]["dp_owned_matrices"] + b["shard"]["stats"][-1]["dp_owned_matrices"] == total
    assert ranks[0]["shard"]["owner"] == ranks[1]["shard"]["owner"]  # TP peers: the same owners
    assert single["stats"][-1]["num_matrices"] == 2 * 4 + 3  # both query groups, gate, up, proj whole


def test_nan_on_one_rank_skips_the_module_everywhere(results):
    ranks, _ = results
    assert ranks[0]["nan"]["owner"][0] == 0  # the poisoned module's owner is not the rank that saw it
    for rank, res in enumerate(ranks):
        before, after = res["nan"]["weights"][NAN_STEP - 1][0], res["nan"]["weights"][NAN_STEP][0]
        stats = res["nan"]["stats"][NAN_STEP]
        if rank % 2 == 0:  # TP rank 0 holds the poisoned head
            assert stats["skipped_nonfinite"] == 1
            assert torch.equal(before[:16], after[:16])  # query group 0, head q0: untouched
            assert not torch.equal(before[16:], after[16:])  # the other heads stepped
        else:
            assert stats["skipped_nonfinite"] == 0
        assert all(torch.isfinite(w).all() for w in res["nan"]["weights"][-1])
