"""Setup hooks for tests and demos run through :func:`.bridge_runner.run_pretrain`.

``install_same_init``: :func:`.factory.install` plus Megatron's CPU initialisation
(``use_cpu_initialization``: the full weight is drawn from one seed, then split), which Bridge
0.3.1's ``setup()`` always turns off. Without it every TP size draws different weights, so runs
with TP=1 and TP=2 cannot be compared step by step.
"""

from __future__ import annotations

import functools


def install_same_init() -> None:
    from megatron.bridge.models.model_provider import ModelProviderMixin

    from ..mcore.optimizers.factory import install

    install()
    original = ModelProviderMixin.provide_distributed_model
    if getattr(original, "_megatron_sso_cpu_init", False):
        return

    @functools.wraps(original)
    def provide(self, *args, **kwargs):
        kwargs["use_cpu_initialization"] = True
        return original(self, *args, **kwargs)

    provide._megatron_sso_cpu_init = True
    ModelProviderMixin.provide_distributed_model = provide


def parameter_holders(optimizer, model_chunks) -> dict[str, list[str]]:
    """For every trainable model parameter, the class names of the torch optimizers inside the
    (chained, wrapped) Megatron ``optimizer`` that hold it (itself, or its fp32 ``main_param``
    under bf16): ``{"decoder.layers.0.mlp.linear_fc1.weight": ["MegatronSphere"], ...}``. Read
    from the optimizers' param groups, not from our routing, so a test can check the routing."""
    owners: dict[int, list[str]] = {}
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(member, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                owners.setdefault(id(p), []).append(type(inner).__name__)
    out = {}
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                main = getattr(p, "main_param", None)
                out[name] = owners.get(id(p), []) + (owners.get(id(main), []) if main is not None else [])
    return out


def layer_check_probe(context) -> dict:
    """``sphere_logging.probe`` plus, on the first iteration, which optimizer holds each parameter
    (:func:`parameter_holders`) and a check on the *real* Megatron
    layer 0: adding noise to one atomic module's view of ``linear_qkv`` (each module in turn)
    must change exactly that head of ``get_query_key_value_tensors``, and the gate/up views of
    ``linear_fc1`` must reproduce the two ``glu`` chunks of its output."""
    import torch

    from ..mcore.observe.sphere_logging import probe
    from ..mcore.optimizers.sphere_optimizer import LAYOUT_ATTR

    out = probe(context)
    if int(context.state.train_state.step) != 0:  # not yet incremented: iteration 1
        return out
    out["holders"] = parameter_holders(context.optimizer, context.model)
    model = context.model[0]
    layers = getattr(getattr(model, "module", model), "decoder").layers
    attn, mlp = layers[0].self_attention, layers[0].mlp
    weight = attn.linear_qkv.weight
    torch.manual_seed(0)
    x = torch.randn(3, 1, weight.size(1))
    changed = []
    with torch.no_grad():
        base = attn.get_query_key_value_tensors(x)
        for mod in getattr(weight, LAYOUT_ATTR).modules:
            saved = weight.detach().clone()
            mod.view(weight.data).add_(0.5)
            new = attn.get_query_key_value_tensors(x)
            weight.data.copy_(saved)
            changed.append([[h for h in range(a.size(2)) if not torch.equal(a[:, :, h], b[:, :, h])]
                            for a, b in zip(base, new)])
        fc1 = getattr(mlp, "linear_fc1", None) or mlp.shared_experts.linear_fc1  # dense or MoE layer
        y, _ = fc1(x)
        gate, up = getattr(fc1.weight, LAYOUT_ATTR).modules
        g_ok = torch.allclose(torch.cat([x @ gate.view(fc1.weight).t(), x @ up.view(fc1.weight).t()], -1), y,
                              atol=1e-5)
    out["qkv_changed_heads"] = changed
    out["glu_views_match"] = bool(g_ok)
    return out
