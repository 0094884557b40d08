"""Atomic modules of Megatron's fused weights are views, and the matrices the forward multiplies by.

Pure torch: the layouts are checked against the forward formulas of megatron-core 0.16.1
(quoted per test). The real layers are exercised in test_sso_pretrain.py.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_sso.mcore.optimizers.layouts import param_layout


def _cfg(**kw):
    base = dict(num_attention_heads=4, num_query_groups=2, kv_channels=8, hidden_size=16,
                ffn_hidden_size=24, moe_ffn_hidden_size=12, gated_linear_unit=True)
    base.update(kw)
    return SimpleNamespace(**base)


def _aliases(view, param):
    start, end = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
    return start <= view.data_ptr() < end and view._base is not None


def _qkv_forward(weight, x, cfg, ng):
    """attention.py get_query_key_value_tensors: mixed = x W^T viewed [.., ng, (np/ng + 2) hn],
    split into q (np/ng heads), k, v per group."""
    hn, qpg = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    mixed = (x @ weight.t()).view(x.size(0), ng, (qpg + 2) * hn)
    q, k, v = torch.split(mixed, [qpg * hn, hn, hn], dim=-1)
    return q.reshape(x.size(0), ng * qpg, hn), k, v


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_heads_are_views_and_the_heads_the_forward_uses(tp):
    cfg = _cfg()
    ng = cfg.num_query_groups // tp
    W = torch.randn(ng * (2 + 2) * 8, 16)  # local shard of a column-parallel QKV
    layout = param_layout("decoder.layers.0.self_attention.linear_qkv.weight", W, cfg, tp)
    kinds = [m.kind for m in layout.modules]
    assert kinds == ["qkv_q", "qkv_q", "qkv_k", "qkv_v"] * ng
    assert all(m.tp_dim is None and m.full_shape == (8, 16) for m in layout.modules)  # whole locally
    x = torch.randn(5, 16)
    q0, k0, v0 = _qkv_forward(W, x, cfg, ng)
    for idx, mod in enumerate(layout.modules):
        view = mod.view(W)
        assert _aliases(view, W) and view.shape == (8, 16)
        W2 = W.clone()
        mod.view(W2).add_(torch.randn(8, 16))
        q, k, v = _qkv_forward(W2, x, cfg, ng)
        g, j = divmod(idx, 4)
        changed_q = [h for h in range(q.size(1)) if not torch.equal(q[:, h], q0[:, h])]
        changed_k = [h for h in range(ng) if not torch.equal(k[:, h], k0[:, h])]
        changed_v = [h for h in range(ng) if not torch.equal(v[:, h], v0[:, h])]
        expect = ([g * 2 + j], [], []) if j < 2 else (([], [g], []) if j == 2 else ([], [], [g]))
        assert (changed_q, changed_k, changed_v) == expect, (idx, mod.name)
        # and the view is exactly that head's weight
        head_out = x @ mod.view(W2).t()
        out = q[:, g * 2 + j] if j < 2 else (k[:, g] if j == 2 else v[:, g])
        assert torch.allclose(head_out, out, atol=1e-5)


def test_qkv_more_tp_ranks_than_groups_is_a_value_error():
    with pytest.raises(ValueError, match="num_query_groups=2"):
        param_layout("x.linear_qkv.weight", torch.zeros(2 * 8, 16), _cfg(), 4)


@pytest.mark.parametrize("rows", [48, 24])  # dense fc1 (2 x ffn) and a TP/expert shard of other size
def test_glu_halves_from_the_tensors_own_shape(rows):
    W = torch.randn(rows, 16)
    layout = param_layout("decoder.layers.0.mlp.linear_fc1.weight", W, _cfg(), 1)
    gate, up = layout.modules
    assert gate.local_shape == up.local_shape == (rows // 2, 16)
    x = torch.randn(3, 16)
    # mlp.py glu: x_glu, x_linear = torch.chunk(x W^T, 2, dim=-1)
    x_glu, x_lin = torch.chunk(x @ W.t(), 2, dim=-1)
    assert torch.allclose(x @ gate.view(W).t(), x_glu) and torch.allclose(x @ up.view(W).t(), x_lin)
    assert _aliases(gate.view(W), W) and _aliases(up.view(W), W)


def test_grouped_mlp_experts_are_expert_major():
    """experts.py GroupedMLP.forward: w1 = weight1.view(E, hidden, -1), w2 = weight2.view(E, -1,
    hidden), expert e computes x @ w1[e] and h @ w2[e]; glu chunks w1[e]'s columns in two."""
    cfg, E = _cfg(), 3
    w1 = torch.randn(16, E * 2 * 12)
    w2 = torch.randn(E * 12, 16)
    l1 = param_layout("decoder.layers.0.mlp.experts.weight1", w1, cfg, 1)
    l2 = param_layout("decoder.layers.0.mlp.experts.weight2", w2, cfg, 1)
    assert [m.kind for m in l1.modules] == ["expert_gate", "expert_up"] * E
    assert [m.full_shape for m in l2.modules] == [(16, 12)] * E
    x = torch.randn(4, 16)
    for e in range(E):
        ref1 = x @ w1.view(E, 16, -1)[e]
        gate, up = l1.modules[2 * e].view(w1), l1.modules[2 * e + 1].view(w1)
        assert _aliases(gate, w1) and _aliases(up, w1) and gate.shape == (12, 16)
        assert torch.allclose(torch.cat([x @ gate.t(), x @ up.t()], dim=-1), ref1)
        h = torch.randn(4, 12)
        fc2 = l2.modules[e].view(w2)
        assert _aliases(fc2, w2) and torch.allclose(h @ fc2.t(), h @ w2.view(E, -1, 16)[e])
        # perturbing expert e's slice changes only expert e's product
        w1b = w1.clone()
        l1.modules[2 * e].view(w1b).add_(1.0)
        for f in range(E):
            same = torch.equal(x @ w1b.view(E, 16, -1)[f], x @ w1.view(E, 16, -1)[f])
            assert same == (f != e)


def test_row_parallel_and_tp_split_fc1_are_marked_sharded():
    proj = torch.randn(16, 8)
    proj.tensor_model_parallel, proj.partition_dim = True, 1
    (mod,) = param_layout("decoder.layers.0.self_attention.linear_proj.weight", proj, _cfg(), 2).modules
    assert mod.tp_dim == 1 and mod.full_shape == (16, 16)
    gate, up = param_layout("decoder.layers.0.mlp.linear_fc1.weight", torch.randn(24, 16), _cfg(), 2).modules
    assert gate.tp_dim == 0 and gate.full_shape == (24, 16)
