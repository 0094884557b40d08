"""A Qwen3-style model provider for Megatron-Bridge, the same on every Bridge release.

Bridge 0.3.1 has ``megatron.bridge.models.qwen.qwen_provider.Qwen3ModelProvider``: a
``GPTModelProvider`` subclass that only changes defaults and adds ``max_position_embeddings``.
Bridge 0.4 removed it (its Qwen3 models are built from Hugging Face configs) and its
``GPTModelProvider`` has no ``max_position_embeddings``. :data:`Qwen3ModelProvider` here is that
subclass rebuilt on the installed ``GPTModelProvider``, so recipes and the runner build the same
model on 0.3.1 and 0.6 with no version test. ``max_position_embeddings`` is kept for recipes: no
Bridge release reads it (the model's position range is ``seq_length``); the CLI checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def qwen3_defaults() -> dict[str, Any]:
    """Qwen3's architecture defaults, as Bridge 0.3.1's ``Qwen3ModelProvider`` declares them
    (RMSNorm 1e-6, SwiGLU, no biases, QK-norm, GQA with 8 KV groups of 128 channels, RoPE base
    1e6, untied embeddings, vocabulary 151936, sequence 40960, no dropout, bf16)."""
    import torch
    import torch.nn.functional as F

    return dict(
        normalization="RMSNorm", activation_func=F.silu, gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=True, kv_channels=128, num_query_groups=8, seq_length=40960,
        init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0, vocab_size=151936,
        share_embeddings_and_output_weights=False, layernorm_epsilon=1e-6, rotary_base=1000000.0,
        position_embedding_type="rope", autocast_dtype=torch.bfloat16, params_dtype=torch.bfloat16, bf16=True,
    )


MAX_POSITION_EMBEDDINGS = 40960
"""Default of the extra ``max_position_embeddings`` field (Bridge 0.3.1's Qwen3 value)."""

_CLASS = None


def _build_class() -> type:
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    types = {f.name: f.type for f in dataclasses.fields(GPTModelProvider)}
    fields = [(name, types[name], dataclasses.field(default=value)) for name, value in qwen3_defaults().items()]
    if "max_position_embeddings" not in types:
        fields.append(("max_position_embeddings", int, dataclasses.field(default=MAX_POSITION_EMBEDDINGS)))
    cls = dataclasses.make_dataclass(
        "Qwen3ModelProvider", fields, bases=(GPTModelProvider,),
        namespace={"__doc__": "Bridge's GPTModelProvider with Qwen3's defaults (megatron_sso.mcore.bridge.qwen3).",
                   "__module__": __name__})
    cls.__qualname__ = "Qwen3ModelProvider"
    return cls


def __getattr__(name: str):
    # Built lazily: importing this module must not import Megatron (layering, the CLI's fast checks).
    if name == "Qwen3ModelProvider":
        global _CLASS
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(name)


def qwen3_provider(**overrides: Any):
    """A :data:`Qwen3ModelProvider` with ``overrides`` (imports Megatron-Bridge)."""
    return __getattr__("Qwen3ModelProvider")(**overrides)
