"""YAML recipes -> Megatron-Bridge ``ConfigContainer``, with errors that name the key and file.

A recipe's keys map 1:1 onto the fields of Bridge's ``ConfigContainer``: ``model.*`` (a
Qwen3-style ``GPTModelProvider``), ``train.*``, ``optimizer.*`` (Bridge's ``OptimizerConfig``
plus every ``sso_*`` and ``spectra_*`` field of
:class:`~megatron_sso.mcore.optimizers.config.SSOOptimizerConfig`),
``scheduler.*``, ``dataset.*``, ``tokenizer.*``, ``checkpoint.*``, ``logger.*``, ``ddp.*``,
``rng.*``, ``dist.*``... Overrides use the same dotted keys (``train.train_iters=50``).

We do not merge with OmegaConf (Bridge's ``process_config_with_overrides``) because a typo
there is silently kept or fails deep inside Megatron with a message that names neither the
key nor the file. Here every key is checked against the dataclass it lands in, every value
against the field's annotation, and the error says ``<file>: <key>: <what is wrong>``.
Two conveniences that YAML 1.1 makes necessary: ``5e-3`` (which PyYAML reads as a string)
is accepted for float fields, and dtype fields take ``bfloat16``/``float32`` names.

The file is read by :func:`read_recipe` without importing Megatron (fast, so a missing or
malformed file fails at once); :func:`build_config` needs Megatron-Bridge (call
:func:`~megatron_sso.mcore.cpu.mode.enable_cpu_mode` first on a CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config_keys import set_key
from .errors import RecipeError

OPTIMIZERS = ("sso", "muon_sphere", "sso_muon", "muon_hyperball", "adam", "signum", "ademamix", "muon")
"""Values of ``--optimizer`` / ``optimizer.optimizer`` this launcher accepts (``muon_hyperball``:
Muon on the Frobenius sphere, ``megatron_sso.optim.hyperball``; ``sso_muon``: our Muon baseline;
``muon``: Megatron's own Muon, left to Megatron, :func:`check_megatron_muon`). ``signum`` and
``ademamix`` (and ``adam`` with ``optimizer.spectra_post_clip`` / ``spectra_pre_clip`` set) run
SPECTRA (``megatron_sso.mcore.optimizers.spectra_factory``)."""

BYTE_VOCAB = 257
"""The byte-level tokenizer of ``prepare-data``: ids 0-255 are bytes, 256 is end-of-document."""


def check_megatron_muon(optimizer: str) -> None:
    """``muon`` is Megatron's own Muon (``megatron.core.optimizer.muon``), which asserts that the
    ``emerging-optimizers`` package is installed when it builds; refuse it before any rank
    starts when that package is missing (it is on the Python 3.11 stack: megatron-core 0.16.1)."""
    import importlib.util

    if optimizer == "muon" and importlib.util.find_spec("emerging_optimizers") is None:
        raise RecipeError("optimizer 'muon' is Megatron's own Muon, which needs the emerging-optimizers package "
                          "(not installed); our Muon baseline is 'sso_muon'")


def read_recipe(path: str | Path) -> dict:
    """The recipe at ``path`` as a nested dict (no Megatron import). Raises RecipeError for a
    missing file, a YAML syntax error or a top level that is not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.train_iters=50"`` -> ``("train.train_iters", 50)`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise RecipeError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def base_config():
    """The defaults every recipe starts from (imports Megatron-Bridge): a Qwen3-style model
    (RMSNorm 1e-6, SwiGLU, GQA, QK-norm, RoPE 1e6, untied, no bias; SPEC §6), the paper's
    optimizer settings (SPEC §2: lr 5e-3 warm-up 500, cosine to 5e-4; AdamW 0.9/0.95, eps 1e-8,
    wd 0.1 for embeddings, norms, output; no decay on the sphere), byte-level data. On a
    machine without CUDA: local (non-TE) layers, no fused kernels, gloo."""
    import torch
    from megatron.bridge.training.config import (CheckpointConfig, ConfigContainer,
                                                 DistributedDataParallelConfig, DistributedInitConfig,
                                                 GPTDatasetConfig, LoggerConfig, RNGConfig,
                                                 SchedulerConfig, TrainingConfig)
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    from ..mcore.optimizers import SSOOptimizerConfig
    from ..mcore.bridge import layer_spec, qwen3_provider

    # layer_spec: Bridge's, except that an MoE model gets its dense layers (moe_layer_freq)
    model_kw: dict[str, Any] = dict(vocab_size=None, make_vocab_size_divisible_by=128,
                                    transformer_layer_spec=layer_spec)
    if not torch.cuda.is_available():
        model_kw.update(
            transformer_impl="local",
            masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
            apply_rope_fusion=False, gradient_accumulation_fusion=False,
            cross_entropy_loss_fusion=False, persist_layer_norm=False,
        )
    return ConfigContainer(
        model=qwen3_provider(**model_kw),
        train=TrainingConfig(train_iters=100, global_batch_size=8, micro_batch_size=1,
                             eval_interval=1000, eval_iters=0),
        optimizer=SSOOptimizerConfig(optimizer="sso", lr=5e-3, min_lr=5e-4, weight_decay=0.1,
                                     adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
                                     use_distributed_optimizer=False),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=500, lr_warmup_init=0.0,
                                  start_weight_decay=0.1, end_weight_decay=0.1,
                                  weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=False, check_for_nan_in_grad=True,
                                          overlap_grad_reduce=False, overlap_param_gather=False),
        dataset=GPTDatasetConfig(seq_length=4096, random_seed=1234, reset_attention_mask=False,
                                 reset_position_ids=False, eod_mask_loss=False, split="99,1,0",
                                 num_workers=0, dataloader_type="single"),
        logger=LoggerConfig(log_interval=10),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=BYTE_VOCAB),
        checkpoint=CheckpointConfig(save=None, load=None),
        rng=RNGConfig(seed=1234),
        dist=DistributedInitConfig(distributed_backend="nccl" if torch.cuda.is_available() else "gloo"),
    )


MONITOR = "monitor"
"""The recipe section (and ``monitor.*`` overrides) that switches on the training monitor of
:mod:`megatron_sso.mcore.observe.monitoring`; it is not a Bridge ``ConfigContainer`` field."""

MONITOR_KEYS = {"path": "a JSON-lines output file", "interval": "steps between snapshots, >= 1",
                "activations": "true/false: activation RMS and max-abs",
                "router": "true/false: MoE router MaxVio"}


def monitor_settings(path: str | Path, overrides: tuple[str, ...] = ()) -> dict | None:
    """The recipe's ``monitor:`` section with ``monitor.*`` overrides applied and checked:
    ``{"path", "interval", "activations", "router"}`` (defaults 10, true, true), or None when
    there is no ``monitor.path`` (the monitor stays off). Unknown keys and wrong types are
    RecipeErrors naming the key and where it came from."""
    section = read_recipe(path).get(MONITOR)
    if section is not None and not isinstance(section, dict):
        raise RecipeError(f"{path}: '{MONITOR}' must be a mapping with keys {', '.join(MONITOR_KEYS)}, "
                          f"got {section!r}")
    items = [(k, v, str(path)) for k, v in (section or {}).items()]
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".", 1)[0] == MONITOR:
            items.append((key.split(".", 1)[1], value, f"override '{text}'"))
    out: dict[str, Any] = {"path": None, "interval": 10, "activations": True, "router": True}
    for key, value, source in items:
        if key not in MONITOR_KEYS:
            raise RecipeError(f"{source}: unknown key '{MONITOR}.{key}' (known: {', '.join(MONITOR_KEYS)})")
        ok = {"path": value is None or (isinstance(value, str) and value.strip() != ""),
              "interval": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              "activations": isinstance(value, bool), "router": isinstance(value, bool)}[key]
        if not ok:
            raise RecipeError(f"{source}: {MONITOR}.{key}: expected {MONITOR_KEYS[key]}, got {value!r}")
        out[key] = value
    return out if out["path"] else None


def _check_spectra(o: Any, path: str | Path) -> None:
    """The ``spectra_*`` values make a valid SPECTRA setup for ``o.optimizer`` (checked here so
    that a bad one fails before any rank starts); a clip set for an optimizer that has no
    SPECTRA form (``sso``...) is an error rather than silently ignored. The rule is
    :func:`~megatron_sso.mcore.optimizers.config.check_spectra`, shared with the Megatron-LM flags."""
    from ..mcore.optimizers import check_spectra

    try:
        check_spectra(o)
    except ValueError as exc:
        raise RecipeError(f"{path}: optimizer: {exc}") from None


def build_config(path: str | Path, optimizer: str | None = None, overrides: tuple[str, ...] = (),
                 data_path: str | None = None):
    """The resolved ``ConfigContainer``: defaults, then the recipe, then ``--optimizer``,
    ``--data-path`` and the dotted overrides, in that order. ``dataset.seq_length`` follows
    ``model.seq_length`` unless given; ``optimizer.bf16`` follows ``model.bf16`` likewise."""
    data = read_recipe(path)
    monitor_settings(path, overrides)  # checked here too; applied by ``pretrain`` (environment)
    overrides = tuple(t for t in overrides if parse_override(t)[0].split(".", 1)[0] != MONITOR)
    cfg = base_config()
    given: set[str] = set()

    for section, value in data.items():
        if section == MONITOR:
            continue
        if not isinstance(value, dict):
            set_key(cfg, str(section), value, str(path))
            given.add(str(section))
            continue
        for k, v in value.items():
            set_key(cfg, f"{section}.{k}", v, str(path))
            given.add(f"{section}.{k}")
    if optimizer is not None:
        set_key(cfg, "optimizer.optimizer", optimizer, "--optimizer")
    if data_path is not None:
        set_key(cfg, "dataset.blend", [[str(data_path)], None], "--data-path")
        set_key(cfg, "dataset.mock", False, "--data-path")
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value, f"override '{text}'")
        given.add(key)
    if cfg.optimizer.optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown optimizer {cfg.optimizer.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    check_megatron_muon(cfg.optimizer.optimizer)
    _check_spectra(cfg.optimizer, path)
    if "optimizer.bf16" not in given:
        cfg.optimizer.bf16 = bool(cfg.model.bf16)
    if cfg.model.pipeline_model_parallel_size > 1 and cfg.model.pipeline_dtype is None:
        cfg.model.pipeline_dtype = cfg.model.params_dtype
    derive(cfg, given, path)
    return cfg


def derive(cfg: Any, given: set[str], path: str | Path) -> None:
    """The values that follow others unless the recipe or an override gives them, shared by
    :func:`build_config` and the Megatron-free :func:`~megatron_sso.cli.preflight.plain_config`
    (``given``: the dotted keys that were set). ``dataset.seq_length`` and (when smaller)
    ``model.max_position_embeddings`` follow ``model.seq_length``; an MoE model under tensor
    parallelism gets ``model.sequence_parallel`` (Megatron's MoE layer refuses to train
    without it); the vocabulary is padded by :func:`resolve_vocab`."""
    m = cfg.model
    if "dataset.seq_length" not in given:
        cfg.dataset.seq_length = m.seq_length
    if m.max_position_embeddings < m.seq_length and "model.max_position_embeddings" not in given:
        m.max_position_embeddings = m.seq_length
    if m.num_moe_experts and m.tensor_model_parallel_size > 1 and "model.sequence_parallel" not in given:
        m.sequence_parallel = True
    if cfg.dataset.seq_length != m.seq_length:
        raise RecipeError(f"{path}: dataset.seq_length={cfg.dataset.seq_length} differs from "
                          f"model.seq_length={m.seq_length}")
    resolve_vocab(cfg, path)


def resolve_vocab(cfg: Any, path: str | Path) -> None:
    """Megatron's vocabulary padding for every recipe and TP size: the model's vocabulary is the
    next multiple of ``make_vocab_size_divisible_by x tensor_model_parallel_size`` above the
    tokenizer's (:func:`~megatron_sso.cli.model_size.padded_vocab`, Megatron-LM's rule and
    Bridge's ``calculate_padded_vocab_size``), so the output layer splits evenly over the ranks:
    257 bytes -> 384 at TP 1, 512 at TP 2. Bridge pads only a size it takes from the tokenizer
    (``model.vocab_size: null``, as the tiny recipes have it); a size given in the model config
    it uses as is, which is how an unpadded 257 reached the ranks (``257 is not divisible by
    2``). So a given ``model.vocab_size`` is padded here, a tokenizer's is left to Bridge. A
    local Hugging Face tokenizer's size is read from its ``tokenizer.json`` into
    ``tokenizer.vocab_size`` (which must match it, or be null), so that ``--dry-run`` counts it."""
    from . import tokenizer_files
    from .model_size import padded_vocab

    m, tok = cfg.model, cfg.tokenizer
    tok_size = tok.vocab_size
    if tok.tokenizer_type == "HuggingFaceTokenizer":
        name = tok.tokenizer_model
        tok_size = None
        if name is None:
            raise RecipeError(f"{path}: tokenizer.tokenizer_model: HuggingFaceTokenizer needs a Hub id or a "
                              "local tokenizer directory")
        if tokenizer_files.looks_local(name):
            if not Path(str(name)).expanduser().is_dir():
                raise RecipeError(f"{path}: tokenizer.tokenizer_model={name!r}: no such tokenizer directory (make one "
                                  "with megatron-sso prepare-data --train-tokenizer N or --tokenizer PATH)")
            try:
                tok_size = tokenizer_files.vocab_size(name)
            except tokenizer_files.TokenizerFileError:
                tok_size = None  # a slow-only (sentencepiece) directory: Bridge reads its size
            if tok_size is not None:
                if tok.vocab_size not in (None, tok_size):
                    raise RecipeError(f"{path}: tokenizer.vocab_size={tok.vocab_size} but {name} holds {tok_size} "
                                      "tokens (set it to null or to that size)")
                tok.vocab_size = tok_size
    if m.vocab_size is None:
        return
    padded = padded_vocab(int(m.vocab_size), int(m.make_vocab_size_divisible_by or 1),
                          int(m.tensor_model_parallel_size))
    if tok_size is not None and padded < tok_size:
        raise RecipeError(f"{path}: model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tok_size} "
                          "tokens (set it to null to follow the tokenizer)")
    m.vocab_size = padded
