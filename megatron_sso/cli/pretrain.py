"""``megatron-sso pretrain``: Megatron-Bridge's real ``pretrain()`` from a YAML recipe.

Three ways to run, chosen from the environment so that one command works everywhere:

* under torchrun / Slurm (``RANK`` and ``WORLD_SIZE`` set): this process is one rank; NCCL on
  GPUs (CPU mode with gloo only when there is no CUDA);
* ``--nproc N`` (no torchrun): N local ranks on this machine with gloo on CPU, started from a
  forkserver that has Megatron-Bridge preloaded (the machinery of
  :mod:`megatron_sso.mcore.bridge.runner`);
* otherwise: one process.

Everything that can be wrong with the input (missing file, unknown key or optimizer, a
layout that does not divide the model, a data prefix without data, more ranks or GPUs than
present) is checked *before* any process group exists, and reported as one line with exit
code 2: first on the recipe's YAML alone (:mod:`.preflight`, under a second), then, after
the one line "loading Megatron-Bridge ...", on the real config, including Bridge's own
``validate()``. ``--dry-run`` prints the resolved config, model size and layout and stops there.
"""

from __future__ import annotations

import argparse
import os
import sys

from .preflight import check_before_import, check_data, layout
from .recipe import OPTIMIZERS, RecipeError, build_config, monitor_settings, read_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--optimizer", default=None,
                   help=f"one of {', '.join(OPTIMIZERS)} (default: the recipe's optimizer.optimizer)")
    p.add_argument("--data-path", default=None,
                   help="prefix of a Megatron indexed dataset (PREFIX.bin/.idx from prepare-data)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks (gloo on CPU) when not under torchrun")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--timeout", type=float, default=None, help="seconds before --nproc ranks are stopped")
    p.add_argument("--spectra-post-clip", type=float, default=None, metavar="C",
                   help="SPECTRA (adam, signum, ademamix): clip each 2-D hidden atomic module's update at "
                        "spectral level C (optimizer.spectra_post_clip; paper: 5 cosine, 10 WSD; 0: off)")
    p.add_argument("--spectra-pre-clip", type=float, default=None, metavar="C",
                   help="SPECTRA: soft-clip raw 2-D gradients at C before global-norm clipping "
                        "(optimizer.spectra_pre_clip; paper: 0.1; 0: off)")
    p.add_argument("--spectra-mode", choices=("soft", "hard"), default=None,
                   help="SPECTRA post-clip: soft sigma/sqrt(1+sigma^2/C^2) or hard min(sigma, C) "
                        "(optimizer.spectra_mode)")
    p.add_argument("overrides", nargs="*", help="dotted Bridge keys, e.g. train.train_iters=50")


SPECTRA_FLAGS = {"spectra_post_clip": "optimizer.spectra_post_clip", "spectra_pre_clip": "optimizer.spectra_pre_clip",
                 "spectra_mode": "optimizer.spectra_mode"}
"""``--spectra-*`` shorthands and the recipe keys they set (before the dotted overrides, like
``--optimizer``)."""


def _overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--spectra-*`` flags as dotted overrides, then the user's own overrides."""
    flags = tuple(f"{key}={getattr(args, attr)}" for attr, key in SPECTRA_FLAGS.items()
                  if getattr(args, attr, None) is not None)
    return flags + tuple(args.overrides)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _check_gpus() -> None:
    """Refuse more ranks on this node than GPUs present (the rank count itself is checked by
    :func:`layout`)."""
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local > torch.cuda.device_count():
            raise RecipeError(f"{local} ranks on this node but only {torch.cuda.device_count()} GPU(s) present")


def megatron_checks(cfg, lay: dict) -> None:
    """Megatron's own checks of the whole config (Bridge's ``ConfigContainer.validate``, which
    every rank runs first), here on a copy in the launching process, so that whatever the
    checks of :mod:`.preflight` do not cover still fails once, in one line, before any rank
    starts."""
    import copy
    import io
    import warnings
    from contextlib import redirect_stdout

    trial = copy.deepcopy(cfg)
    trial.data_parallel_size = lay["dp"]
    try:  # its notes and warnings are the ranks' to print (they run validate() again): not twice
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial.validate()
    except (ValueError, AssertionError, TypeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise RecipeError(f"Megatron refuses the config: {text}") from None


def describe(cfg, lay: dict, path: str) -> str:
    """The ``--dry-run`` report: model size, layout, optimizer, schedule, data."""
    from ..mcore.optimizers import (MEGATRON_SETTINGS, SPECTRA_OPTIMIZERS, SPECTRA_SETTINGS, SPHERE_OPTIMIZERS,
                                spectra_enabled)
    from ..optim.config import SphereConfig
    from .model_size import count_parameters

    m, o, s, t = cfg.model, cfg.optimizer, cfg.scheduler, cfg.train
    if m.vocab_size is None and cfg.tokenizer.vocab_size is None:
        raise RecipeError(f"{path}: the vocabulary size is known only once the tokenizer loads; set "
                          "model.vocab_size (or tokenizer.vocab_size) for --dry-run")
    size = count_parameters(m, cfg.tokenizer.vocab_size)  # pads a tokenizer's size as Bridge will
    moe = (f"MoE: {m.num_moe_experts} experts x {m.moe_ffn_hidden_size}, top-{m.moe_router_topk}, "
           f"shared {m.moe_shared_expert_intermediate_size}, {size.moe_layers} MoE + {size.dense_layers} dense layers, "
           f"router dtype {m.moe_router_dtype}, dispatcher {m.moe_token_dispatcher_type}"
           if m.num_moe_experts else "dense")
    lines = [
        f"recipe: {path}",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads {m.num_attention_heads}"
        f" / kv groups {m.num_query_groups} / head dim {m.kv_channels}, seq {m.seq_length}, "
        f"vocab {size.padded_vocab_size} (padded: tokenizer {cfg.tokenizer.vocab_size or cfg.tokenizer.tokenizer_model}, multiple of "
        f"{m.make_vocab_size_divisible_by} x TP {m.tensor_model_parallel_size}), {m.normalization} "
        f"{m.layernorm_epsilon}, qk_layernorm {m.qk_layernorm}, swiglu {m.gated_linear_unit}, rope base "
        f"{m.rotary_base}, tied {m.share_embeddings_and_output_weights}, bf16 {m.bf16}",
        f"ffn: {moe}",
        f"total parameters: {size.total}",
        f"active parameters: {size.active}",
        f"embedding parameters: {size.embedding}",
        f"non-embedding parameters: {size.non_embedding_total} total, {size.non_embedding_active} active",
        f"parallel: world {lay['world']} (minimum {lay['minimum']}) = TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']}"
        f" x DP {lay['dp']}; EP {lay['ep']}, expert TP {lay['etp']}; sequence_parallel {m.sequence_parallel}",
        f"train: {t.train_iters} iterations x global batch {t.global_batch_size} (micro {t.micro_batch_size}) x seq "
        f"{m.seq_length} = {t.train_iters * t.global_batch_size * m.seq_length} tokens",
        f"optimizer: {o.optimizer} lr {o.lr:g} -> min_lr {o.min_lr:g}, warmup {s.lr_warmup_iters}, "
        f"{s.lr_decay_style}; AdamW part: betas ({o.adam_beta1}, {o.adam_beta2}) eps {o.adam_eps:g} wd "
        f"{o.weight_decay:g}; clip_grad {o.clip_grad}; distributed optimizer {o.use_distributed_optimizer}",
    ]
    if o.optimizer in SPHERE_OPTIMIZERS:
        names = [f"sso_{n}" for n in SphereConfig.field_names() if n != "mode"] + list(MEGATRON_SETTINGS)
        lines.append("sso: " + " ".join(f"{n[4:]}={getattr(o, n)}" for n in names))
    if o.optimizer in SPECTRA_OPTIMIZERS or spectra_enabled(o):
        lines.append("spectra: " + " ".join(f"{n[8:]}={getattr(o, n)}" for n in SPECTRA_SETTINGS))
    ds = cfg.dataset
    data = "mock (random tokens)" if ds.mock else f"blend {ds.blend} split {ds.split}"
    lines.append(f"data: {data}; tokenizer {cfg.tokenizer.tokenizer_type} vocab {cfg.tokenizer.vocab_size}")
    lines.append(f"checkpoint: save {cfg.checkpoint.save} every {cfg.checkpoint.save_interval}, load {cfg.checkpoint.load}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    read_recipe(args.config)  # missing / malformed file: fail before importing Megatron
    monitor = monitor_settings(args.config, tuple(args.overrides))  # likewise a bad monitor.* key
    if args.optimizer is not None and args.optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown optimizer {args.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if args.nproc is not None and (args.nproc < 1 or _under_torchrun()):
        raise RecipeError(f"--nproc {args.nproc}: must be >= 1 and cannot be combined with torchrun")
    world = int(os.environ["WORLD_SIZE"]) if _under_torchrun() else args.nproc
    overrides = _overrides(args)
    check_before_import(args.config, args.optimizer, overrides, args.data_path, world, args.dry_run)
    if os.environ.get("RANK", "0") == "0":  # ~15-25 s of imports follow: say so
        print("loading Megatron-Bridge ...", flush=True)
    from ..mcore.cpu import enable_cpu_mode

    enable_cpu_mode()
    cfg = build_config(args.config, args.optimizer, overrides, args.data_path)
    lay = layout(cfg, world if world or args.dry_run else 1)  # dry run: the smallest layout
    megatron_checks(cfg, lay)
    if args.dry_run:
        print(describe(cfg, lay, args.config), flush=True)
        if monitor:
            print("monitor: " + " ".join(f"{k}={v}" for k, v in monitor.items()), flush=True)
        return 0
    if monitor:  # the recipe's monitor section wins over MEGATRON_SSO_MONITOR*; ranks inherit it
        from ..mcore.observe import monitor_environment

        os.environ.update(monitor_environment(**{**monitor, "path": os.path.abspath(monitor["path"])}))
    _check_gpus()
    check_data(cfg)
    job = dict(config=args.config, optimizer=args.optimizer, overrides=overrides,
               data_path=args.data_path)
    from . import launch

    if _under_torchrun() or lay["world"] == 1:
        return launch.run_rank(job)
    return launch.run_local(job, lay["world"], timeout_s=args.timeout)


def main_safe(args: argparse.Namespace) -> int:
    """:func:`run` with input errors turned into one line on stderr and exit code 2."""
    try:
        return run(args)
    except RecipeError as exc:
        print(f"megatron-sso pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 2

