"""The transformer layer spec recipes use: Bridge's, except that MoE models honour ``moe_layer_freq``.

Megatron-Bridge 0.3.1's spec functions (``local_layer_spec``, ``transformer_engine_layer_spec``
in ``megatron/bridge/models/gpt_provider.py``) build *one* layer spec from ``num_moe_experts``,
and Megatron builds every decoder layer from it: a recipe's ``moe_layer_freq`` (the MoE
8B-A1B recipe's first layer is dense, SPEC §6) is silently ignored and every layer is MoE.
Measured on ``tiny_moe_cpu.yaml`` (``moe_layer_freq: [0, 1]``): routers in both layers.
megatron-core's ``get_gpt_decoder_block_spec`` reads the pattern, and ``GPTModel`` accepts its
block spec where a layer spec goes; Bridge calls a callable ``transformer_layer_spec`` with the
provider (and ``vp_stage``), so this function can stand in for Bridge's.
"""

from __future__ import annotations

from typing import Any, Optional


def layer_spec(config: Any, vp_stage: Optional[int] = None) -> Any:
    """Bridge's layer spec for a dense model; for an MoE model megatron-core's decoder block
    spec (dense and MoE layers per ``moe_layer_freq``, this pipeline stage's layers only).

    ``config.transformer_impl == "local"`` selects the local (non-Transformer-Engine) modules,
    as the CPU recipes do; otherwise Transformer Engine's, as Bridge's default does.
    """
    local = getattr(config, "transformer_impl", "transformer_engine") == "local"
    if config.num_moe_experts:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=not local,
                                          normalization=config.normalization, vp_stage=vp_stage)
    from megatron.bridge.models.gpt_provider import default_layer_spec, local_layer_spec

    return local_layer_spec(config) if local else default_layer_spec(config)
