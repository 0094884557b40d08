"""Run Megatron-Bridge's real ``pretrain()`` on a tiny GPT in N local gloo ranks.

Used by the integration tests (stock Adam here; SSO and friends later) and the CLI:

    >>> from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain
    >>> run = run_pretrain(TinyGPTSpec(train_iters=4), world_size=2)
    >>> run.losses          # {iteration: "lm loss"} as reduced by Megatron
    {1: 5.559, 2: 5.538, 3: 5.407, 4: 5.213}

or from a shell: ``python -m megatron_sso.mcore.bridge.runner --world-size 2 --tp 2
model.sequence_parallel=true``.

Every rank is a fresh process (Megatron keeps global state) started with
``torch.multiprocessing`` (forked from a forkserver that has preloaded Megatron-Bridge, or
spawned), rendezvousing on 127.0.0.1 with the gloo backend.
Each rank calls :func:`megatron_sso.mcore.cpu.mode.enable_cpu_mode` first (a no-op on a
GPU machine), optionally runs a *setup hook* (``"package.module:function"``, e.g. to
register an optimizer), builds the Bridge ``ConfigContainer`` from a picklable
:class:`TinyGPTSpec`, applies Hydra-style dotted overrides, runs ``pretrain`` with a
callback that records per-iteration losses, and writes them as JSON for the parent.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = [
    "PretrainRun",
    "RankResult",
    "TinyGPTSpec",
    "build_tiny_config",
    "free_port",
    "run_pretrain",
]


@dataclass(frozen=True)
class TinyGPTSpec:
    """A picklable description of a tiny Bridge pretraining run (mock data, fp32).

    ``qwen3=True`` builds a shrunk Qwen3-style model (RMSNorm, QK-norm, RoPE, SwiGLU,
    GQA with ``num_query_groups`` KV groups, no biases, untied embeddings); otherwise a
    plain GPT (LayerNorm, GELU, biases). ``overrides`` are Hydra-style dotted overrides
    applied last (``"optimizer.lr=3e-3"``, ``"model.num_layers=3"``).
    """

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    seq_length: int = 32
    vocab_size: int = 256
    qwen3: bool = True
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_iters: int = 4
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    warmup_iters: int = 1
    use_distributed_optimizer: bool = False
    seed: int = 1234
    overrides: tuple[str, ...] = ()


def build_tiny_config(spec: TinyGPTSpec):
    """The Megatron-Bridge ``ConfigContainer`` for ``spec`` (imports Megatron-Bridge).

    On a CPU call :func:`~megatron_sso.mcore.cpu.mode.enable_cpu_mode` before this.
    """
    import torch
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        DistributedInitConfig,
        LoggerConfig,
        MockGPTDatasetConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TrainingConfig,
    )
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    from .layer_specs import layer_spec
    from .qwen3 import qwen3_provider

    no_fusions = dict(
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False, persist_layer_norm=False,
    )
    common = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
        seq_length=spec.seq_length,
        vocab_size=spec.vocab_size, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=spec.tensor_parallel,
        pipeline_model_parallel_size=spec.pipeline_parallel,
        pipeline_dtype=torch.float32 if spec.pipeline_parallel > 1 else None,
        transformer_layer_spec=layer_spec, transformer_impl="local",
        bf16=False, fp16=False, params_dtype=torch.float32, autocast_dtype=torch.float32,
        **no_fusions,
    )
    if spec.qwen3:
        model = qwen3_provider(
            num_query_groups=spec.num_query_groups, max_position_embeddings=spec.seq_length,
            kv_channels=spec.hidden_size // spec.num_attention_heads, **common,
        )
    else:
        model = GPTModelProvider(**common)
    dist_opt = spec.use_distributed_optimizer
    from ..optimizers import SPECTRA_OPTIMIZERS, SPHERE_OPTIMIZERS

    spectra = any(o.startswith("optimizer.spectra_") for o in spec.overrides)
    if spec.optimizer in SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS or spectra:  # the subclass with sso_*/spectra_*
        from ..optimizers import SSOOptimizerConfig as OptimizerConfig  # noqa: N814
    cfg = ConfigContainer(
        model=model,
        train=TrainingConfig(
            train_iters=spec.train_iters, global_batch_size=spec.global_batch_size,
            micro_batch_size=spec.micro_batch_size, eval_interval=10**9, eval_iters=0,
        ),
        optimizer=OptimizerConfig(
            optimizer=spec.optimizer, lr=spec.lr, min_lr=spec.min_lr,
            weight_decay=spec.weight_decay, bf16=False, fp16=False,
            use_distributed_optimizer=dist_opt, clip_grad=spec.clip_grad,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style="cosine", lr_warmup_iters=spec.warmup_iters, lr_warmup_init=0.0,
            start_weight_decay=spec.weight_decay, end_weight_decay=spec.weight_decay,
            weight_decay_incr_style="constant",
        ),
        ddp=DistributedDataParallelConfig(
            use_distributed_optimizer=dist_opt, overlap_grad_reduce=False,
            overlap_param_gather=False, grad_reduce_in_fp32=False, check_for_nan_in_grad=True,
        ),
        dataset=MockGPTDatasetConfig(
            seq_length=spec.seq_length, random_seed=spec.seed, reset_attention_mask=False,
            reset_position_ids=False, eod_mask_loss=False, split="1,0,0",
            num_workers=0, dataloader_type="single",
        ),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=spec.vocab_size),
        checkpoint=CheckpointConfig(save=None, load=None),
        rng=RNGConfig(seed=spec.seed),
        dist=DistributedInitConfig(distributed_backend="gloo"),
    )
    if spec.overrides:
        from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

        cfg = process_config_with_overrides(cfg, cli_overrides=list(spec.overrides))
    return cfg


@dataclass
class RankResult:
    """What one rank saw. ``losses`` maps iteration -> {loss name: value}; it is empty on
    ranks that are not on the last pipeline stage."""

    rank: int
    losses: dict[int, dict[str, float]] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    skipped_iterations: list[int] = field(default_factory=list)
    probes: dict[int, dict] = field(default_factory=dict)
    cpu_mode: bool = False
    cpu_mode_patches: list[str] = field(default_factory=list)
    cpu_mode_pending: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class PretrainRun:
    """The result of :func:`run_pretrain`."""

    world_size: int
    ranks: list[RankResult]
    wall_s: float

    def loss_series(self, name: str = "lm loss") -> dict[int, float]:
        """Per-iteration ``name`` from the first rank that logged it (Megatron reduces the
        loss over data-parallel ranks, so every last-stage rank holds the same values)."""
        for r in self.ranks:
            if r.losses:
                return {it: vals[name] for it, vals in sorted(r.losses.items())}
        return {}

    @property
    def losses(self) -> dict[int, float]:
        return self.loss_series()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it; released before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call_hook(hook: str | None) -> None:
    if hook:
        module, _, func = hook.partition(":")
        getattr(importlib.import_module(module), func or "install")()


def _resolve(hook: str | None):
    if not hook:
        return None
    module, _, func = hook.partition(":")
    return getattr(importlib.import_module(module), func)


def _rank_main(local_rank: int, world_size: int, port: int, spec: TinyGPTSpec,
               out_dir: str, setup_hook: str | None, probe: str | None = None) -> None:
    """Body of one spawned rank (module level so that spawn can pickle it)."""
    start = time.perf_counter()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
        LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    from megatron_sso.mcore.cpu import cpu_mode_report, enable_cpu_mode

    cpu = enable_cpu_mode()
    _call_hook(setup_hook)
    cfg = build_tiny_config(spec)

    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    result = RankResult(rank=local_rank, cpu_mode=cpu)
    probe_fn = _resolve(probe)

    class _Recorder(Callback):
        def on_train_step_end(self, context) -> None:
            step = int(context.state.train_state.step) + 1  # Megatron's 1-based iteration
            if context.loss_dict:
                result.losses[step] = {k: float(v) for k, v in context.loss_dict.items()}
            if context.grad_norm is not None:
                result.grad_norms[step] = float(context.grad_norm)
            if context.skipped_iter:
                result.skipped_iterations.append(step)
            if probe_fn is not None:
                result.probes[step] = probe_fn(context)

    pretrain(cfg, forward_step, callbacks=[_Recorder()])
    report = cpu_mode_report()
    result.cpu_mode_patches, result.cpu_mode_pending = list(report.applied), list(report.pending)
    result.wall_s = time.perf_counter() - start
    Path(out_dir, f"rank{local_rank}.json").write_text(json.dumps(dataclasses.asdict(result)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


PRELOAD = "megatron_sso.mcore.bridge.preload"


def join_ranks(ctx, deadline: Optional[float], timeout_message: str) -> None:
    """Wait for spawned ranks; past ``deadline`` (``time.perf_counter()`` units, ``None`` for
    none) or when a rank fails, kill every rank still alive and re-raise."""
    try:
        while not ctx.join(timeout=0.5):
            if deadline is not None and time.perf_counter() > deadline:
                raise RuntimeError(timeout_message)
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        raise


def run_pretrain(spec: TinyGPTSpec = TinyGPTSpec(), world_size: int = 1, *,
                 setup_hook: str | None = None, probe: str | None = None, timeout_s: float = 300.0,
                 port: int | None = None, start_method: str = "forkserver") -> PretrainRun:
    """Run Bridge's ``pretrain()`` for ``spec`` in ``world_size`` local gloo ranks.

    ``setup_hook`` (``"module:function"``, function defaulting to ``install``) runs in
    every rank after CPU mode is enabled and before the config is built. ``probe``
    (``"module:function"``) is called in every rank after every iteration with Bridge's
    callback context; what it returns (JSON-able) lands in ``RankResult.probes``. Raises
    RuntimeError if a rank fails or the run exceeds ``timeout_s``.

    ``start_method="forkserver"`` (default) forks every rank from one server process per
    parent that has imported Megatron-Bridge once (:mod:`.preload`): a rank starts
    in about a second instead of ~10 s of imports. The server keeps the environment of the
    moment it started. ``"spawn"`` starts every rank from scratch.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    tp, pp = spec.tensor_parallel, spec.pipeline_parallel
    if world_size % (tp * pp):
        raise ValueError(f"world_size={world_size} is not a multiple of TP*PP={tp * pp}")
    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megatron_sso_run_") as out_dir:
        ctx = mp.start_processes(
            _rank_main, args=(world_size, port or free_port(), spec, out_dir, setup_hook, probe),
            nprocs=world_size, join=False, start_method=start_method,
        )
        try:
            join_ranks(ctx, start + timeout_s, f"pretrain run exceeded {timeout_s:.0f} s")
        except Exception as exc:
            raise RuntimeError(f"Bridge pretrain in {world_size} rank(s) failed: {exc}") from exc
        ranks = []
        for rank in range(world_size):
            data = json.loads(Path(out_dir, f"rank{rank}.json").read_text())
            data["losses"] = {int(k): v for k, v in data["losses"].items()}
            data["grad_norms"] = {int(k): v for k, v in data["grad_norms"].items()}
            data["probes"] = {int(k): v for k, v in data["probes"].items()}
            ranks.append(RankResult(**data))
    return PretrainRun(world_size=world_size, ranks=ranks, wall_s=time.perf_counter() - start)



def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_sso.mcore.bridge.runner``: run and print the losses as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--hook", default=None, help="module:function run in every rank first")
    parser.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. optimizer.lr=1e-2")
    args = parser.parse_args(argv)
    spec = TinyGPTSpec(tensor_parallel=args.tp, pipeline_parallel=args.pp, train_iters=args.iters,
                       optimizer=args.optimizer, overrides=tuple(args.overrides))
    run = run_pretrain(spec, world_size=args.world_size, setup_hook=args.hook)
    print(json.dumps({"world_size": run.world_size, "wall_s": round(run.wall_s, 1),
                      "lm_loss": run.losses, "grad_norm": run.ranks[-1].grad_norms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
