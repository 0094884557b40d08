"""CLI pieces that need no Megatron: parameter counting, override parsing, recipe reading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_sso.cli.model_size import count_parameters, moe_layer_pattern, padded_vocab
from megatron_sso.cli.recipe import RecipeError, parse_override, read_recipe

QWEN = dict(normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=True,
            qk_layernorm=True, position_embedding_type="rope", share_embeddings_and_output_weights=False,
            make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, num_moe_experts=None)


def test_tiny_dense_count_matches_megatron():
    # configs/tiny_dense_cpu.yaml with its vocabulary pinned to 257 (before issue 15); Megatron itself
    # reported "number of parameters ... 459776"
    cfg = SimpleNamespace(**QWEN, num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                          num_query_groups=2, kv_channels=32, vocab_size=257, seq_length=128)
    size = count_parameters(cfg)
    assert size.total == size.active == 459776
    # the vocabulary left to the tokenizer is padded as Bridge pads it: Megatron reported 1442560 for
    # configs/tiny_dense_bpe_cpu.yaml (4096 BPE tokens) and builds 384 rows for the 257 bytes
    bpe = count_parameters(SimpleNamespace(**{**vars(cfg), "vocab_size": None}), 4096)
    assert bpe.total == 1442560 and bpe.padded_vocab_size == 4096
    assert count_parameters(SimpleNamespace(**{**vars(cfg), "vocab_size": None}), 257).padded_vocab_size == 384


def test_moe_counts_active_experts_only():
    cfg = SimpleNamespace(**{**QWEN, "num_moe_experts": 8}, num_layers=2, hidden_size=16, ffn_hidden_size=64,
                          num_attention_heads=2, num_query_groups=1, kv_channels=8, vocab_size=100,
                          moe_ffn_hidden_size=4, moe_router_topk=2, moe_shared_expert_intermediate_size=4,
                          moe_layer_freq=[0, 1], seq_length=8)
    size = count_parameters(cfg)
    expert = 3 * 16 * 4
    assert size.total - size.active == (8 - 2) * expert
    assert (size.moe_layers, size.dense_layers) == (1, 1)


def test_vocab_padding_and_layer_pattern():
    assert padded_vocab(257, 128, 1) == 384 and padded_vocab(257, 128, 2) == 512
    assert moe_layer_pattern(4, 8, 2) == [True, False, True, False]
    assert moe_layer_pattern(3, None, 1) == [False] * 3
    with pytest.raises(ValueError, match="moe_layer_freq has 2 entries"):
        moe_layer_pattern(3, 8, [0, 1])


def test_parse_override():
    assert parse_override("train.train_iters=50") == ("train.train_iters", 50)
    assert parse_override("optimizer.sso_lambda_solver=bisect") == ("optimizer.sso_lambda_solver", "bisect")
    assert parse_override("checkpoint.save=null") == ("checkpoint.save", None)
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_override("iters50")


def test_read_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="config file not found: .*missing.yaml"):
        read_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML \(line"):
        read_recipe(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        read_recipe(bad)
