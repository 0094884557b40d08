"""Which parameters the sphere optimizers take (``chain.route``, ``chain.assign_layouts``).

MoE with ``moe_shared_expert_gate``: megatron-core 0.16.1's ``SharedExpertMLP`` holds
``shared_experts.gate_weight`` of shape ``(1, hidden)`` (``transformer/moe/shared_experts.py``),
a gating vector like the router. It was routed to the sphere, and the build failed ("has 1
local rows"); it now goes to Adam with the router (issue 13 item 5).
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_sso.mcore.optimizers.chain import assign_layouts, route
from megatron_sso.mcore.optimizers.sphere_optimizer import check_cache_fits
from megatron_sso.optim.config import SphereConfig

HIDDEN = 32
CFG = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=8, hidden_size=HIDDEN,
                      ffn_hidden_size=48, gated_linear_unit=True, num_moe_experts=4, moe_ffn_hidden_size=16)


class _MoELayer(torch.nn.Module):
    """The parameter names and shapes of one megatron-core 0.16.1 MoE layer with a shared
    expert and its gate (SequentialMLP experts, GLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = CFG
        shapes = {
            "decoder.layers.0.self_attention.linear_qkv.weight": (2 * (2 + 2) * 8, HIDDEN),
            "decoder.layers.0.mlp.router.weight": (4, HIDDEN),
            "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight": (32, HIDDEN),
            "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": (96, HIDDEN),
            "decoder.layers.0.mlp.shared_experts.linear_fc2.weight": (HIDDEN, 48),
            "decoder.layers.0.mlp.shared_experts.gate_weight": (1, HIDDEN),
        }
        self._names = {}
        for i, (name, shape) in enumerate(shapes.items()):
            p = torch.nn.Parameter(torch.randn(shape))
            self.register_parameter(f"p{i}", p)
            self._names[f"p{i}"] = name

    def named_parameters(self, *args, **kwargs):
        for key, p in super().named_parameters(*args, **kwargs):
            yield self._names[key], p


@pytest.mark.parametrize("router_on_sphere", [False, True])
def test_gating_vectors_go_to_adam(router_on_sphere):
    gate = torch.empty(1, HIDDEN)
    assert route("decoder.layers.0.mlp.shared_experts.gate_weight", gate, router_on_sphere) == "adam"
    assert route("x.weight", torch.empty(HIDDEN, 1), router_on_sphere) == "adam"  # a column vector too
    assert route("decoder.layers.0.mlp.router.weight", torch.empty(4, HIDDEN), router_on_sphere) == \
        ("sphere" if router_on_sphere else "adam")
    assert route("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", torch.empty(96, HIDDEN),
                 router_on_sphere) == "sphere"


def test_moe_layer_with_a_shared_expert_gate_builds():
    layer = _MoELayer()
    names = dict((id(p), n) for n, p in layer.named_parameters())
    matrices, others = assign_layouts([layer], {"dense": None, "expert": None}, False, True, True,
                                      lambda layout: check_cache_fits(SphereConfig(), layout))
    assert {names[id(p)].rsplit(".", 2)[-2] for p in others} == {"router", "shared_experts"}
    assert "decoder.layers.0.mlp.shared_experts.gate_weight" in {names[id(p)] for p in others}
    assert len(matrices) == 4
