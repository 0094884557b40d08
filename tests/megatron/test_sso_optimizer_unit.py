"""MegatronSphere on one process: state is param-shaped (torch_dist-ready), modules land on
their spheres, stats reach a TensorBoard-like writer, and too-small modules are refused."""

from types import SimpleNamespace

import pytest
import torch

from megatron_sso.mcore.optimizers.layouts import param_layout
from megatron_sso.mcore.observe.sphere_logging import exact_norm_errors, log_sphere_stats
from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR, MegatronSphere, cache_block, check_cache_fits
from megatron_sso.optim.config import SphereConfig

CFG = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=16, hidden_size=32,
                      ffn_hidden_size=48, gated_linear_unit=True)


def _params():
    qkv = torch.nn.Parameter(torch.randn(2 * 4 * 16, 32))
    fc1 = torch.nn.Parameter(torch.randn(96, 32))
    for name, p in (("l.self_attention.linear_qkv.weight", qkv), ("l.mlp.linear_fc1.weight", fc1)):
        setattr(p, LAYOUT_ATTR, param_layout(name, p, CFG, 1))
    return [qkv, fc1]


def test_steps_keep_modules_on_sphere_with_param_shaped_state():
    params = _params()
    opt = MegatronSphere([{"params": params, "lr": 1e-2, "weight_decay": 0.1}], SphereConfig())
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        state = opt.state[p]
        assert set(state) == {"momentum_buffer", "sphere_cache", "step"}
        assert state["momentum_buffer"].shape == p.shape == state["sphere_cache"].shape
        assert float(state["step"]) == 3.0
        for mod in getattr(p, LAYOUT_ATTR).modules:  # packed: V^T rows, then lambda and slope rows
            cache = mod.view(state["sphere_cache"])
            b = cache_block(opt.cfg, mod)
            vt = cache[:b]
            assert torch.allclose(vt @ vt.t(), torch.eye(b), atol=1e-4)
            assert torch.all(cache[b] == cache[b, 0]) and torch.all(cache[b + 1] == cache[b + 1, 0])
    errors = exact_norm_errors(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)]))
    assert set(errors) == {"qkv_q", "qkv_k", "qkv_v", "gate", "up"} and max(errors.values()) < 1e-4


def test_stats_reach_the_writer():
    params = _params()
    opt = MegatronSphere([{"params": params, "lr": 1e-2}], SphereConfig())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    written = {}
    writer = SimpleNamespace(add_scalar=lambda k, v, it: written.__setitem__(k, (v, it)))
    stats = log_sphere_stats(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)]), 7, writer)
    assert written["sso/msign_calls_per_matrix"] == (4.0, 7)  # cold first solve
    assert stats["sso/num_matrices"] == 8 + 2 and stats["sso/max_abs_h"] < 2e-4
    assert stats["sso/qkv_q/update_rms"] > 0 and "sso/up/norm_error" in stats


def test_small_heads_get_a_smaller_cached_block_and_tiny_ones_an_error():
    p = torch.zeros(2 * 4 * 8, 32)  # head dim 8: room for a 6-column block + lambda + slope
    layout = param_layout("x.linear_qkv.weight", p, SimpleNamespace(**{**vars(CFG), "kv_channels": 8}), 1)
    check_cache_fits(SphereConfig(), layout)
    assert {cache_block(SphereConfig(), mod) for mod in layout.modules} == {6}
    tiny = param_layout("x.linear_qkv.weight", torch.zeros(2 * 4 * 2, 32),
                        SimpleNamespace(**{**vars(CFG), "kv_channels": 2}), 1)
    with pytest.raises(ValueError, match="has 2 local rows"):
        check_cache_fits(SphereConfig(), tiny)