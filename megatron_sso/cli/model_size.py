"""Analytic parameter counts of a Megatron GPT model, from its config alone.

``--dry-run`` must report the model size without building the model (a 8B MoE does not fit
in a laptop's memory, and building it would start Megatron's heavy machinery), so the count
is computed from the config's numbers, layer by layer, following megatron-core's GPT layer
layout: word (and learned position) embeddings; per layer an input norm, fused QKV with GQA
(``nq`` query heads, ``ng`` KV groups of ``kv_channels``), optional QK-norm over the head
dimension, the output projection, a pre-MLP norm and either a dense (Swi)GLU MLP or an MoE
block (router + routed experts + optional shared expert); a final norm; the output layer
unless tied. "Active" parameters count only ``moe_router_topk`` routed experts per token.

The config is read by attribute (any object with megatron-core ``TransformerConfig`` field
names), so this module imports nothing from Megatron and is unit-testable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts (plain integers). ``embedding`` = input embeddings + untied output."""

    total: int
    active: int
    embedding: int
    padded_vocab_size: int
    moe_layers: int
    dense_layers: int

    @property
    def non_embedding_total(self) -> int:
        return self.total - self.embedding

    @property
    def non_embedding_active(self) -> int:
        return self.active - self.embedding


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = max(1, divisible_by) * max(1, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def moe_layer_pattern(num_layers: int, num_experts: Any, freq: Any) -> list[bool]:
    """Which layers are MoE layers: megatron-core's ``moe_layer_freq`` is an int k (every
    k-th layer, starting with layer 0) or an explicit 0/1 list of length ``num_layers``."""
    if not num_experts:
        return [False] * num_layers
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    pattern = [bool(x) for x in freq]
    if len(pattern) != num_layers:
        raise ValueError(f"moe_layer_freq has {len(pattern)} entries but num_layers={num_layers}")
    return pattern


def count_parameters(cfg: Any, vocab_size: int | None = None) -> ModelSize:
    """Count the parameters of the GPT model described by ``cfg`` (a model provider /
    TransformerConfig). ``vocab_size`` is used when ``cfg.vocab_size`` is None: Bridge then
    takes the tokenizer's size and pads it to ``make_vocab_size_divisible_by * TP``; a size
    given in the model config is used as is."""
    g = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    h, layers, nq = int(g("hidden_size")), int(g("num_layers")), int(g("num_attention_heads"))
    ng = int(g("num_query_groups") or nq)
    d = int(g("kv_channels") or h // nq)
    vocab = g("vocab_size")
    if vocab is None or g("should_pad_vocab", False):  # Bridge pads only a tokenizer-given size
        vocab = vocab or vocab_size
        if vocab is None:
            raise ValueError("vocab_size is unknown: set model.vocab_size or tokenizer.vocab_size")
        vocab = padded_vocab(int(vocab), int(g("make_vocab_size_divisible_by", 128) or 1),
                             int(g("tensor_model_parallel_size", 1) or 1))
    vocab = int(vocab)
    layernorm = g("normalization", "LayerNorm") == "LayerNorm"
    norm = 2 * h if layernorm else h  # LayerNorm has a bias, RMSNorm only a gain
    bias = bool(g("add_bias_linear", True))
    qkv_bias = bias or bool(g("add_qkv_bias", False))
    glu = 2 if g("gated_linear_unit", False) else 1

    qkv_out = nq * d + 2 * ng * d
    attn = norm + h * qkv_out + (qkv_out if qkv_bias else 0) + nq * d * h + (h if bias else 0)
    if g("qk_layernorm", False):
        attn += 2 * (2 * d if layernorm else d)

    def mlp(ffn: int) -> int:
        return h * ffn * glu + ffn * h + ((ffn * glu + h) if bias else 0)

    pattern = moe_layer_pattern(layers, g("num_moe_experts"), g("moe_layer_freq", 1))
    dense_ffn = int(g("ffn_hidden_size") or 4 * h)
    dense_layer = attn + norm + mlp(dense_ffn)
    total = active = 0
    for is_moe in pattern:
        if not is_moe:
            total += dense_layer
            active += dense_layer
            continue
        experts, topk = int(g("num_moe_experts")), int(g("moe_router_topk", 2))
        expert = mlp(int(g("moe_ffn_hidden_size") or dense_ffn))
        shared_ffn = g("moe_shared_expert_intermediate_size")
        shared = mlp(int(shared_ffn)) + (h if g("moe_shared_expert_gate", False) else 0) if shared_ffn else 0
        common = attn + norm + experts * h + shared  # router weight: (experts, h)
        total += common + experts * expert
        active += common + topk * expert
    final = norm
    embedding = vocab * h
    if g("position_embedding_type", "learned_absolute") == "learned_absolute":
        embedding += int(g("max_position_embeddings") or g("seq_length")) * h
    if not g("share_embeddings_and_output_weights", True):
        embedding += vocab * h
    total += final + embedding
    active += final + embedding
    return ModelSize(total=total, active=active, embedding=embedding, padded_vocab_size=vocab,
                     moe_layers=sum(pattern), dense_layers=layers - sum(pattern))
