"""One training rank of ``megatron-sso pretrain``, and N of them on one machine.

:func:`run_rank` is the body every rank runs: CPU mode (a no-op with CUDA), our optimizer
names in Megatron's factory, the recipe resolved again in this process (configs hold
callables and live Megatron objects, so they are rebuilt rather than pickled), then Bridge's
``pretrain(cfg, forward_step)`` with a progress callback. Under torchrun the environment
already names the rank; :func:`run_local` provides it for N local gloo ranks, started like
:func:`megatron_sso.mcore.bridge.runner.run_pretrain` starts its ranks (a forkserver with
Megatron-Bridge preloaded, so a rank starts in about a second).
"""

from __future__ import annotations

import math
import os
import sys
import time


def _progress_callback(world_size: int):
    """Prints one line per iteration on the last rank (it is on the last pipeline stage, so
    it holds the loss Megatron reduced over data-parallel ranks): loss, lr, tokens/s and the
    sphere optimizer's spectral-norm / solver summary, or SPECTRA's clip summary."""
    import torch.distributed as dist
    from megatron.bridge.training.callbacks import Callback

    from ..mcore.observe import spectra_stats, sphere_stats

    class Progress(Callback):
        def __init__(self) -> None:
            self.t_step = self.t_start = time.perf_counter()
            self.first = self.last = None

        def _printer(self) -> bool:
            return not dist.is_initialized() or dist.get_rank() == world_size - 1

        def on_train_step_start(self, context) -> None:
            self.t_step = time.perf_counter()

        def on_train_step_end(self, context) -> None:
            stats = sphere_stats(context.optimizer) if context.optimizer is not None else {}
            spectra = spectra_stats(context.optimizer) if context.optimizer is not None else {}
            if not self._printer():
                return
            cfg = context.state.cfg
            it, total = int(context.state.train_state.step) + 1, cfg.train.train_iters
            dt = max(time.perf_counter() - self.t_step, 1e-9)
            tokens = cfg.train.global_batch_size * cfg.model.seq_length
            loss = float(context.loss_dict.get("lm loss", float("nan"))) if context.loss_dict else float("nan")
            self.first = loss if self.first is None else self.first
            self.last = loss
            groups = getattr(context.optimizer, "param_groups", None) or []
            lr = max((g["lr"] for g in groups), default=float("nan"))
            msg = f"iter {it:6d}/{total}  loss {loss:.4f}  lr {lr:.3e}  tokens/s {tokens / dt:,.0f}"
            errors = [v for k, v in stats.items() if k.endswith("/norm_error")]
            if errors:
                msg += (f"  |W|2/R-1 max {max(errors):.1e}  msign/matrix {stats.get('sso/msign_calls_per_matrix', 0):.1f}"
                        f"  max|h| {stats.get('sso/max_abs_h', 0):.1e}  max|lambda| {stats.get('sso/max_abs_lambda', 0):.1e}")
            if spectra:
                msg += (f"  spectra clipped {spectra.get('spectra/num_clipped', 0)}/{spectra['spectra/num_matrices']}"
                        f"  |D|2 max {spectra.get('spectra/max_sigma_pre', 0):.3g}"
                        f"  |dW/lr|2 max {spectra.get('spectra/max_sigma_post', 0):.3g}")
                if spectra.get("spectra/pre_clipped"):
                    msg += f"  pre-clipped {spectra['spectra/pre_clipped']}"
            if context.skipped_iter:
                msg += "  (skipped)"
            print(msg, flush=True)

        def on_train_end(self, context) -> None:
            if self._printer() and self.first is not None:
                ok = math.isfinite(self.last) and self.last < self.first
                print(f"done: loss {self.first:.4f} -> {self.last:.4f} "
                      f"({'fell' if ok else 'did NOT fall'}) in {time.perf_counter() - self.t_start:.1f} s",
                      flush=True)

    return Progress()


def run_rank(job: dict) -> int:
    """Train as one rank (torchrun's, ours, or the only one). ``job``: config, optimizer,
    overrides, data_path. Returns 0."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from ..mcore.bridge import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    import torch

    from ..mcore.cpu import enable_cpu_mode
    from ..mcore.optimizers import install
    from .recipe import build_config

    world = int(os.environ["WORLD_SIZE"])
    if not torch.cuda.is_available():
        if world == int(os.environ["LOCAL_WORLD_SIZE"]):  # all ranks on this machine: loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
        # Megatron's sequence-parallel layers warn unless this is 1; it orders CUDA streams, so
        # on a CPU it changes nothing and the warning (at every start of an MoE TP run) is noise
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    enable_cpu_mode()
    install()
    cfg = build_config(job["config"], job["optimizer"], job["overrides"], job["data_path"])
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from ..mcore.observe import spectra_logging_callback, sphere_logging_callback

    from ..mcore.observe import callbacks_from_env  # MEGATRON_SSO_MONITOR=path.jsonl; off by default

    pretrain(cfg, forward_step, callbacks=[_progress_callback(world), sphere_logging_callback(),
                                           spectra_logging_callback(),
                                           *callbacks_from_env()])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _local_rank_main(local_rank: int, world_size: int, port: int, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    if local_rank != world_size - 1:  # only the printing rank talks; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    run_rank(job)


def run_local(job: dict, world_size: int, timeout_s: float | None = None) -> int:
    """Run ``world_size`` local ranks (gloo) and wait; returns 0, or 1 when a rank failed
    (its last error line is printed)."""
    import multiprocessing

    import torch.multiprocessing as mp

    from ..mcore.bridge import PRELOAD, free_port, join_ranks

    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    ctx = mp.start_processes(_local_rank_main, args=(world_size, free_port(), job), nprocs=world_size,
                             join=False, start_method="forkserver")
    deadline = time.perf_counter() + timeout_s if timeout_s else None
    try:
        join_ranks(ctx, deadline, f"stopped after --timeout {timeout_s:.0f} s" if timeout_s else "")
    except Exception as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        print(f"megatron-sso pretrain: a rank failed: {lines[-1] if lines else exc}", file=sys.stderr, flush=True)
        return 1
    return 0
