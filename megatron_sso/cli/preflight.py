"""The checks ``megatron-sso pretrain`` makes before any rank starts, and a Megatron-free view
of a recipe so that most of them run before the slow Megatron-Bridge import.

A rank that starts with a bad layout dies deep inside Megatron (``AssertionError: 257 is not
divisible by 2``), after ~25 s of imports and ~100 s of start-up on a busy machine. The same
rules, written here once, run twice: on :func:`plain_config` (the recipe's YAML, the command
line and the defaults below; no Megatron, well under a second) and again on the real
``ConfigContainer`` (authoritative: a value whose type only Bridge resolves is checked there).
Every failure is a :class:`~megatron_sso.cli.recipe.RecipeError`: one line, exit code 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .model_size import moe_layer_pattern
from .recipe import MONITOR, RecipeError, derive, parse_override, read_recipe

PLAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                  expert_model_parallel_size=1, expert_tensor_parallel_size=None, num_attention_heads=0,
                  num_query_groups=8, num_layers=0, num_moe_experts=None, moe_router_topk=2, moe_layer_freq=1,
                  sequence_parallel=False, seq_length=40960, max_position_embeddings=40960,
                  position_embedding_type="rope", vocab_size=None, make_vocab_size_divisible_by=128),
    "train": dict(global_batch_size=8, micro_batch_size=1),
    "dataset": dict(mock=False, blend=None, blend_per_split=None, seq_length=4096),
    "tokenizer": dict(tokenizer_type="NullTokenizer", tokenizer_model=None, vocab_size=257),
}
"""What :func:`~megatron_sso.cli.recipe.base_config` starts from, for the fields the checks
read: Bridge 0.3.1's ``Qwen3ModelProvider`` defaults (``num_query_groups`` 8, ``seq_length``
40960, RoPE) with our ``make_vocab_size_divisible_by`` 128, our ``TrainingConfig`` (global batch
8, micro 1), ``GPTDatasetConfig`` (no mock, seq 4096) and byte-level ``TokenizerConfig``.
``tests/cli/test_cli_megatron.py`` compares every field with the real config of every recipe."""


def plain_config(path: str | Path, optimizer: str | None = None, overrides: tuple[str, ...] = (),
                 data_path: str | None = None) -> SimpleNamespace:
    """The recipe resolved like :func:`~megatron_sso.cli.recipe.build_config` does, for the
    sections and fields of :data:`PLAIN_DEFAULTS` only, without importing Megatron. Keys it
    does not know are left for the real build to check (and report)."""
    sections = {name: SimpleNamespace(**copy.deepcopy(fields)) for name, fields in PLAIN_DEFAULTS.items()}
    given: set[str] = set()

    def put(key: str, value: Any) -> None:
        section, _, field = key.partition(".")
        if section in sections and field in PLAIN_DEFAULTS[section]:
            setattr(sections[section], field, value)
        given.add(key)

    for section, value in read_recipe(path).items():
        if section != MONITOR and isinstance(value, dict):
            for k, v in value.items():
                put(f"{section}.{k}", v)
    if data_path is not None:
        put("dataset.blend", [[str(data_path)], None])
        put("dataset.mock", False)
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".", 1)[0] != MONITOR:
            put(key, value)
    cfg = SimpleNamespace(**sections, optimizer=SimpleNamespace(optimizer=optimizer))
    derive(cfg, given, path)
    return cfg


def _int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecipeError(f"{name}: expected int, got {value!r}")
    return value


def check_model(cfg) -> None:
    """Heads, query groups, layers, experts, router top-k, sequence parallelism and sequence
    length against the parallel sizes: each rule is one that Megatron (or our per-head atomic
    modules) asserts inside a rank."""
    m = cfg.model
    tp = _int("model.tensor_model_parallel_size", m.tensor_model_parallel_size)
    pp = _int("model.pipeline_model_parallel_size", m.pipeline_model_parallel_size)
    cp = _int("model.context_parallel_size", m.context_parallel_size)
    ep = _int("model.expert_model_parallel_size", m.expert_model_parallel_size)
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep)):
        if value < 1:
            raise RecipeError(f"model.{name}={value} must be >= 1")
    heads = _int("model.num_attention_heads", m.num_attention_heads)
    groups = _int("model.num_query_groups", m.num_query_groups or heads)
    if heads % tp:
        raise RecipeError(f"model.tensor_model_parallel_size={tp} does not divide num_attention_heads={heads}")
    if groups % tp:
        raise RecipeError(f"model.tensor_model_parallel_size={tp} does not divide num_query_groups={groups} "
                          "(each rank needs whole KV groups)")
    if groups and heads % groups:
        raise RecipeError(f"model.num_query_groups={groups} does not divide num_attention_heads={heads}")
    layers = _int("model.num_layers", m.num_layers)
    if layers % pp:
        raise RecipeError(f"model.pipeline_model_parallel_size={pp} does not divide num_layers={layers}")
    experts = m.num_moe_experts
    if experts:
        experts = _int("model.num_moe_experts", experts)
        if experts % ep:
            raise RecipeError(f"model.expert_model_parallel_size={ep} does not divide num_moe_experts={experts}")
        if _int("model.moe_router_topk", m.moe_router_topk) > experts:
            raise RecipeError(f"model.moe_router_topk={m.moe_router_topk} exceeds num_moe_experts={experts}")
        try:
            moe_layer_pattern(layers, experts, m.moe_layer_freq)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"model.moe_layer_freq={m.moe_layer_freq!r}: {exc}") from None
        if tp > 1 and not m.sequence_parallel:
            raise RecipeError(f"model.sequence_parallel=false with MoE and tensor_model_parallel_size={tp}: Megatron "
                              "trains MoE under tensor parallelism only with sequence parallelism (leave it unset)")
    elif ep > 1:
        raise RecipeError(f"model.expert_model_parallel_size={ep} needs an MoE model (model.num_moe_experts)")
    seq = _int("model.seq_length", m.seq_length)
    if m.sequence_parallel and tp == 1:
        raise RecipeError("model.sequence_parallel=true needs tensor_model_parallel_size > 1")
    if m.sequence_parallel and seq % tp:
        raise RecipeError(f"model.seq_length={seq} is not a multiple of tensor_model_parallel_size={tp} "
                          "(sequence parallelism splits the sequence)")
    if cp > 1 and seq % (2 * cp):
        raise RecipeError(f"model.seq_length={seq} is not a multiple of 2 x context_parallel_size={cp}")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < seq:
        raise RecipeError(f"model.seq_length={seq} exceeds max_position_embeddings={m.max_position_embeddings} "
                          "(learned absolute position embeddings)")


def layout(cfg, world_size: int | None) -> dict:
    """The parallel layout, after :func:`check_model`. ``world_size`` None: the smallest that
    fits. Raises RecipeError for a rank count the layout does not divide and for a global
    batch that is not a multiple of micro batch x data-parallel size."""
    check_model(cfg)
    m = cfg.model
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    cp, ep = m.context_parallel_size, m.expert_model_parallel_size
    etp = m.expert_tensor_parallel_size or tp
    minimum = tp * pp * cp
    while (minimum // pp) % (ep * etp):
        minimum += tp * pp * cp
    world = world_size or minimum
    if world < minimum or world % minimum:
        raise RecipeError(f"the recipe needs a multiple of {minimum} ranks (TP {tp} x PP {pp} x CP {cp}, "
                          f"EP {ep}), have {world}: use --nproc {minimum} (CPU) or torchrun with {minimum} GPUs")
    dp = world // (tp * pp * cp)
    gbs = _int("train.global_batch_size", cfg.train.global_batch_size)
    mbs = _int("train.micro_batch_size", cfg.train.micro_batch_size)
    if mbs < 1 or gbs < 1:
        raise RecipeError(f"train.global_batch_size={gbs} and micro_batch_size={mbs} must be >= 1")
    if gbs % (mbs * dp):
        per_rank = gbs // dp if gbs % dp == 0 else 0
        fit = max((d for d in range(1, min(mbs, per_rank) + 1) if per_rank % d == 0), default=0)
        hint = (f"set train.micro_batch_size={fit}" if fit else
                f"set train.global_batch_size={mbs * dp * max(1, gbs // (mbs * dp))}")
        raise RecipeError(f"train.global_batch_size={gbs} is not a multiple of "
                          f"micro_batch_size {mbs} x data-parallel size {dp}: {hint}")
    return dict(world=world, minimum=minimum, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, dp=dp)


def _is_weight(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def check_data(cfg) -> list[str]:
    """Every prefix of the blend has a non-empty .bin and an .idx; returns the prefixes."""
    ds = cfg.dataset
    if getattr(ds, "mock", False):
        return []
    prefixes: list[str] = []
    for blend in [ds.blend] + list(ds.blend_per_split or []):
        if blend:
            paths = blend[0]
            prefixes += [p for p in paths if not _is_weight(p)]
    if not prefixes:
        raise RecipeError("no training data: pass --data-path PREFIX (from prepare-data), set dataset.blend, "
                          "or dataset.mock=true for random tokens")
    for prefix in prefixes:
        bin_, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        if not bin_.is_file() or not idx.is_file():
            raise RecipeError(f"data path {prefix!r} has no data: {bin_} / {idx} not found "
                              "(make them with megatron-sso prepare-data)")
        if bin_.stat().st_size == 0:
            raise RecipeError(f"data path {prefix!r} has no data: {bin_} is empty")
    return prefixes


def check_before_import(path: str, optimizer: str | None, overrides: tuple[str, ...], data_path: str | None,
                        world: int | None, dry_run: bool) -> None:
    """Everything above on :func:`plain_config`. A value of a type only the real build can
    resolve (``expected int, got ...``) is skipped here; the real build names it."""
    try:
        cfg = plain_config(path, optimizer, overrides, data_path)
        layout(cfg, world if world or dry_run else 1)
    except TypeError:  # e.g. seq_length "many" compared with an int: the real build names the key
        return
    except RecipeError as exc:
        if ": expected int, got " in str(exc):
            return
        raise
    if not dry_run:
        check_data(cfg)
