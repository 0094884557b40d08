"""``megatron-sso pretrain``'s checks before launch, without Megatron: each rule a rank would hit
as an assertion is one line and exit code 2 from the recipe alone, in well under a second."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sso.cli.preflight import check_before_import, layout, plain_config
from megatron_sso.cli.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[2]
DENSE, MOE, DEEP = "configs/tiny_dense_cpu.yaml", "configs/tiny_moe_cpu.yaml", "configs/tiny_deepnet_cpu.yaml"


def _cfg(path: str, *overrides: str, data_path: str | None = None):
    return plain_config(ROOT / path, None, overrides, data_path)


@pytest.mark.parametrize("path, overrides, world, pattern", [
    (DENSE, ["model.tensor_model_parallel_size=3"], 3, r"tensor_model_parallel_size=3 does not divide num_attention_heads=4"),
    (DEEP, ["model.tensor_model_parallel_size=2"], 4, r"does not divide num_query_groups=1"),
    (DENSE, ["model.num_query_groups=3"], 1, r"num_query_groups=3 does not divide num_attention_heads=4"),
    (DEEP, ["model.pipeline_model_parallel_size=3"], 3, r"pipeline_model_parallel_size=3 does not divide num_layers=8"),
    (MOE, ["model.expert_model_parallel_size=3"], 3, r"expert_model_parallel_size=3 does not divide num_moe_experts=4"),
    (DENSE, ["model.expert_model_parallel_size=2"], 2, r"needs an MoE model"),
    (MOE, ["model.moe_router_topk=5"], 1, r"moe_router_topk=5 exceeds num_moe_experts=4"),
    (MOE, ["model.moe_layer_freq=[0, 1, 1]"], 1, r"moe_layer_freq=\[0, 1, 1\]: moe_layer_freq has 3 entries"),
    (MOE, ["model.tensor_model_parallel_size=2", "model.sequence_parallel=false"], 2, r"only with sequence parallelism"),
    (DENSE, ["model.sequence_parallel=true"], 1, r"sequence_parallel=true needs tensor_model_parallel_size > 1"),
    (DENSE, ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "model.seq_length=127",
             "model.max_position_embeddings=127"], 2, r"seq_length=127 is not a multiple of tensor_model_parallel_size=2"),
    (DENSE, ["model.context_parallel_size=2", "model.seq_length=126"], 2, r"seq_length=126 is not a multiple of 2 x context"),
    (DENSE, ["model.position_embedding_type=learned_absolute", "model.max_position_embeddings=64"], 1,
     r"seq_length=128 exceeds max_position_embeddings=64"),
    (DENSE, ["train.global_batch_size=7", "train.micro_batch_size=2"], 1,
     r"global_batch_size=7 is not a multiple of micro_batch_size 2 x data-parallel size 1"),
    (DENSE, ["train.global_batch_size=16", "train.micro_batch_size=16"], 2,
     r"global_batch_size=16 is not a multiple of micro_batch_size 16 x data-parallel size 2: "
     r"set train.micro_batch_size=8"),
    (DENSE, ["train.global_batch_size=16"], 3,
     r"micro_batch_size 8 x data-parallel size 3: set train.global_batch_size=24"),
    (DEEP, [], 3, r"needs a multiple of 2 ranks"),
])
def test_rank_assertions_become_one_line_before_import(path, overrides, world, pattern):
    with pytest.raises(RecipeError, match=pattern):
        layout(_cfg(path, *overrides), world)


def test_layouts_the_tiny_recipes_run_at_tp2():
    # MoE under TP gets sequence parallelism unless the user said otherwise (Megatron's MoE layer
    # refuses to train without it); the byte vocabulary is left to Bridge, which pads it.
    moe = _cfg(MOE, "model.tensor_model_parallel_size=2")
    assert moe.model.sequence_parallel is True and moe.model.vocab_size is None
    assert layout(moe, 2)["tp"] == 2
    assert layout(_cfg(DENSE, "model.tensor_model_parallel_size=2", "train.micro_batch_size=8"), 2)["dp"] == 1
    assert layout(_cfg(DEEP, "model.tensor_model_parallel_size=2", "model.num_query_groups=2"), 4)["pp"] == 2


def test_explicit_vocab_is_padded_for_the_tp_size():
    """A vocabulary given in the model config is padded here, by Megatron's rule (Bridge pads
    only a tokenizer's): the 257 that reached the ranks unpadded."""
    for tp, padded in ((1, 384), (2, 512), (4, 512), (8, 1024)):
        cfg = _cfg(DENSE, "model.vocab_size=257", f"model.tensor_model_parallel_size={tp}",
                   "model.num_attention_heads=8", "model.num_query_groups=8")
        assert cfg.model.vocab_size == padded, (tp, cfg.model.vocab_size)
    with pytest.raises(RecipeError, match="model.vocab_size=200 is smaller than the tokenizer's 257"):
        _cfg(DENSE, "model.vocab_size=200")


def test_missing_local_tokenizer_and_data_fail_before_import(tmp_path):
    with pytest.raises(RecipeError, match=r"tokenizer_model='data/nothing.tokenizer': no such tokenizer directory"):
        _cfg(DENSE, "tokenizer.tokenizer_type=HuggingFaceTokenizer", "tokenizer.tokenizer_model=data/nothing.tokenizer")
    with pytest.raises(RecipeError, match=r"data path '.*nothing' has no data"):
        check_before_import(str(ROOT / DENSE), None, (), str(tmp_path / "nothing"), None, False)
    # a value only the real build can type-check is left to it (it names the key there)
    check_before_import(str(ROOT / DENSE), None, ("train.global_batch_size=many",), None, None, False)


def test_bad_batch_fails_fast_through_the_cli():
    """The issue's symptom: every error came after ~25 s of silent imports (15.9 s measured on an
    idle machine). Now the recipe is checked before torch or Megatron is imported."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_sso", "pretrain", "--config", DENSE,
                           "train.global_batch_size=7", "train.micro_batch_size=2"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ})
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == ["megatron-sso pretrain: error: train.global_batch_size=7 is not a multiple of "
                     "micro_batch_size 2 x data-parallel size 1: set train.micro_batch_size=1"], lines
    assert "loading Megatron-Bridge" not in proc.stdout
    assert seconds < 5, seconds
    probe = subprocess.run([sys.executable, "-c", "import sys, megatron_sso.cli.main, megatron_sso.cli.preflight; "
                            "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr
