"""optimizer=sso on an MoE with a gated shared expert, through Bridge's real pretrain() on CPU.

``model.moe_shared_expert_gate=true`` gives every MoE layer ``shared_experts.gate_weight``
(``1 x hidden``, megatron-core 0.16.1). It was routed to the sphere and the optimizer build
failed ("has 1 local rows", issue 13 item 5); it now goes to Adam like the router, and the run
trains with every sphere module on its sphere.
"""

from __future__ import annotations

import math

import pytest

from test_cpu_mode import CUDA_FREE, NEEDS_MEGATRON  # noqa: E402  (same skip rules)

pytestmark = [CUDA_FREE, NEEDS_MEGATRON, pytest.mark.megatron, pytest.mark.distributed]
MOE = ("model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_intermediate_size=32", "model.moe_shared_expert_gate=true",
       "model.moe_token_dispatcher_type=allgather", "model.moe_grouped_gemm=false",
       "model.hidden_dropout=0.0", "model.attention_dropout=0.0")


def test_moe_with_a_shared_expert_gate_trains():
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    run = run_pretrain(TinyGPTSpec(optimizer="sso", lr=1e-2, train_iters=2, overrides=MOE), world_size=1,
                       setup_hook="megatron_sso.mcore.optimizers.factory:install",
                       probe="megatron_sso.mcore.observe.sphere_logging:probe", timeout_s=600)
    assert sorted(run.losses) == [1, 2] and all(math.isfinite(v) for v in run.losses.values()), run.losses
    probe = run.ranks[0].probes[2]
    kinds = set(probe["norm_errors"])
    assert {"shared_gate", "shared_up", "shared_linear_fc2", "expert_gate"} <= kinds, kinds
    assert not any("shared_experts" in k for k in kinds), kinds  # the gate vector is Adam's
    assert max(probe["norm_errors"].values()) < 1e-3, probe["norm_errors"]
