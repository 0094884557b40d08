"""TEGroupedMLP experts (megatron-core 0.17+): atomic modules of ``linear_fc1.weight<i>`` /
``linear_fc2.weight<i>``, one 2-D tensor per local expert. Transformer Engine cannot run on a CPU,
so the parameters are built here with the names, shapes and attributes megatron-core 0.19.2 gives
them (read from its source, quoted per test), and our views are checked against the forward
formula, for aliasing, and by one real sphere step measured with float64 SVD.

Source facts (megatron-core 0.19.2, Transformer Engine ``GroupedLinear``):
* ``transformer/moe/experts.py`` ``TEGroupedMLP.__init__``: ``linear_fc1`` is a column-parallel
  grouped linear ``(num_local_experts, hidden, 2 * moe_ffn_hidden_size if gated else ...)``,
  ``linear_fc2`` row-parallel ``(num_local_experts, moe_ffn_hidden_size, hidden)``; the input is
  ``moe_latent_size`` instead of ``hidden`` when that is set.
* ``extensions/transformer_engine.py`` ``TEGroupedLinear``: with expert TP > 1 the output (column)
  or input (row) size is divided by the expert TP size before TE is built;
  ``_set_expert_parameter_attributes`` marks every ``weight<i>`` ``tensor_model_parallel=True``
  with ``partition_dim`` 0 (column) or 1 (row), ``allreduce=False``.
* TE ``GroupedLinear``: ``register_parameter(f"weight{i}", (out_features, in_features))`` for
  each GEMM ``i``, applied as ``y = x W_i^T`` to that expert's tokens.
* ``TEGroupedMLP.forward`` (no ``moe_mlp_glu_interleave_size``): the gated activation halves the
  fc1 output with ``torch.chunk(x, 2, dim=-1)``: gate first, then up, of the local rows.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_sso.mcore.optimizers.layouts import param_layout
from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR, MegatronSphere
from megatron_sso.ops.retraction import target_radius
from megatron_sso.optim.config import SphereConfig

HIDDEN, FFN, EXPERTS = 16, 12, 3
PREFIX = "decoder.layers.1.mlp.experts."


def _cfg(**kw):
    base = dict(num_attention_heads=4, num_query_groups=2, kv_channels=4, hidden_size=HIDDEN, ffn_hidden_size=48,
                moe_ffn_hidden_size=FFN, gated_linear_unit=True, moe_mlp_glu_interleave_size=None)
    base.update(kw)
    return SimpleNamespace(**base)


def te_grouped_mlp_params(etp: int, gated: bool = True, latent=None) -> dict[str, torch.nn.Parameter]:
    """``named_parameters()`` of one TEGroupedMLP on one expert-TP rank: ``weight<i>`` per local
    expert, shapes and TP attributes as megatron-core 0.19.2 / TE create them (module docstring)."""
    d_in = latent or HIDDEN
    fc1_out = (2 * FFN if gated else FFN) // etp
    params = {}
    for i in range(EXPERTS):
        for kind, shape, dim in (("linear_fc1", (fc1_out, d_in), 0), ("linear_fc2", (d_in, FFN // etp), 1)):
            p = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float32))
            p.tensor_model_parallel, p.partition_dim, p.partition_stride, p.allreduce = True, dim, 1, False
            params[f"{PREFIX}{kind}.weight{i}"] = p
    return params


def _aliases(view, param):
    start, end = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
    return start <= view.data_ptr() < end and view._base is not None


@pytest.mark.parametrize("etp,latent", [(1, None), (2, None), (1, 8)])
def test_per_expert_gate_up_and_fc2_views_match_the_forward(etp, latent):
    cfg, d_in = _cfg(), latent or HIDDEN
    x = torch.randn(5, d_in)
    for name, p in te_grouped_mlp_params(etp, latent=latent).items():
        layout = param_layout(name, p, cfg, etp)
        assert layout.expert and layout.tp_size == etp
        if ".linear_fc1." in name:
            gate, up = layout.modules
            assert (gate.kind, up.kind) == ("expert_gate", "expert_up")
            assert gate.local_shape == up.local_shape == (FFN // etp, d_in)
            assert gate.full_shape == up.full_shape == (FFN, d_in)  # the expert's whole gate, over expert TP
            assert gate.tp_dim == (0 if etp > 1 else None)
            x_glu, x_lin = torch.chunk(x @ p.t(), 2, dim=-1)  # y = x W_i^T, then the GLU halves
            torch.testing.assert_close(x @ gate.view(p).t(), x_glu)  # float32 tolerances: the sums differ in order
            torch.testing.assert_close(x @ up.view(p).t(), x_lin)
            assert _aliases(gate.view(p), p) and _aliases(up.view(p), p)
        else:
            (fc2,) = layout.modules
            assert fc2.kind == "expert_linear_fc2" and fc2.local_shape == (d_in, FFN // etp)
            assert fc2.full_shape == (d_in, FFN) and fc2.tp_dim == (1 if etp > 1 else None)
            assert fc2.view(p).data_ptr() == p.data_ptr()


def test_ungated_fc1_is_one_module_per_expert():
    cfg = _cfg(gated_linear_unit=False)
    for name, p in te_grouped_mlp_params(1, gated=False).items():
        (mod,) = param_layout(name, p, cfg, 1).modules
        assert mod.kind in ("expert_linear_fc1", "expert_linear_fc2") and mod.full_shape == tuple(p.shape)


def test_writing_a_view_reaches_exactly_its_rows_of_the_parameter():
    params = te_grouped_mlp_params(1)
    name = f"{PREFIX}linear_fc1.weight1"
    p = params[name]
    before = p.detach().clone()
    _, up = param_layout(name, p, _cfg(), 1).modules
    with torch.no_grad():
        up.view(p).mul_(3.0)
    assert torch.equal(p[:FFN], before[:FFN]) and torch.equal(p[FFN:], 3.0 * before[FFN:])


def test_one_sphere_step_puts_every_expert_view_on_its_own_radius():
    """After one MegatronSphere step every gate, up and fc2 view has ``sigma = sqrt(d_out / d_in)``
    of its own shape by float64 SVD (gate/up: ``sqrt(12 / 16)``; a whole-fc1 module would get
    ``sqrt(24 / 16)``, fc2: ``sqrt(16 / 12)``). The weights start at sigma ~ 7, far off."""
    cfg = _cfg()
    params = te_grouped_mlp_params(1)
    mods = {}
    for name, p in params.items():
        layout = param_layout(name, p, cfg, 1)
        setattr(p, LAYOUT_ATTR, layout)
        mods[name] = layout.modules
    opt = MegatronSphere([{"params": list(params.values()), "lr": 1e-2}], SphereConfig())
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    seen = set()
    for name, p in params.items():
        for mod in mods[name]:
            sigma = torch.linalg.matrix_norm(mod.view(p.detach()).double(), ord=2).item()
            radius = target_radius(*mod.full_shape)
            assert abs(sigma / radius - 1) < 1e-3, (mod.name, sigma, radius)
            seen.add((mod.kind, round(radius, 4)))
    assert seen == {("expert_gate", round((FFN / HIDDEN) ** 0.5, 4)), ("expert_up", round((FFN / HIDDEN) ** 0.5, 4)),
                    ("expert_linear_fc2", round((HIDDEN / FFN) ** 0.5, 4))}


def test_interleaved_glu_is_refused_by_name():
    """``moe_mlp_glu_interleave_size`` (0.19): fc1 rows alternate gate and up blocks
    (``TEGroupedMLP._remove_glu_interleaving``), so no 2-D view holds a half."""
    p = te_grouped_mlp_params(1)[f"{PREFIX}linear_fc1.weight0"]
    with pytest.raises(ValueError, match="moe_mlp_glu_interleave_size=4"):
        param_layout(f"{PREFIX}linear_fc1.weight0", p, _cfg(moe_mlp_glu_interleave_size=4), 1)
    (mod,) = param_layout(f"{PREFIX}linear_fc1.weight0", p, _cfg(moe_mlp_glu_interleave_size=4), 1,
                          split_glu=False).modules
    assert mod.full_shape == tuple(p.shape)
