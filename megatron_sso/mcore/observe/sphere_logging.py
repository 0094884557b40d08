"""What the sphere optimizers measured, for Megatron's logger and TensorBoard writer.

Cheap by design: the step keeps its statistics as device tensors and they are read here, once per
log interval. Keys (``sso/`` prefix): ``msign_calls_per_matrix``, ``max_abs_h`` (solver
residual), ``max_abs_lambda``, ``lambda_fallbacks``, ``skipped_nonfinite``, ``tp_gather_bytes``
and, per module kind (``qkv_q``, ``qkv_k``, ``qkv_v``, ``linear_proj``, ``gate``, ``up``,
``linear_fc2``, ``expert_*``): ``<kind>/norm_error``, ``<kind>/start_norm_error`` and
``<kind>/update_rms``.

``max_abs_h`` is the smallest ``|h|`` of an msign the solver really evaluated (the applied
direction, interpolated or projected, has ``h = 0`` by construction); ``lambda_above_tol``
counts the matrices left above ``lambda_tol``. ``norm_error`` is max ``| ||W||_2 / R - 1 |`` of
the stored weights measured here, independently of the optimizer: a fresh block power iteration
(:data:`NORM_CHECK_BLOCK` x :data:`NORM_CHECK_ITERS`) from a random start, so a broken cached
block or too few power iterations show. ``start_norm_error`` is the optimizer's own figure (the
Ritz value of its cached block on the weights a step started from, which the previous step
retracted with): about 1e-7 by construction after a module's first step.

Bridge: pass ``sphere_logging_callback()`` in ``pretrain(..., callbacks=[...])``. Megatron-LM:
call :func:`log_sphere_stats` with ``get_tensorboard_writer()`` after ``train_step``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from ..optimizers import LAYOUT_ATTR, MegatronSphere

logger = logging.getLogger(__name__)


def inner_optimizers(optimizer: Any, cls: type) -> list:
    """The torch optimizers of type ``cls`` inside a (chained, wrapped) Megatron optimizer."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return [m.optimizer for m in members if isinstance(getattr(m, "optimizer", None), cls)]


def sphere_optimizers(optimizer: Any) -> list[MegatronSphere]:
    """The :class:`MegatronSphere` instances inside a (chained, wrapped) Megatron optimizer."""
    return inner_optimizers(optimizer, MegatronSphere)


NORM_CHECK_BLOCK = 32
"""Columns of the monitor's independent power iteration. Measured on the hidden matrices of a
2-layer dim-128 byte-level GPT after 100 SSO steps at lr 5e-2 (top 5 singular values within
1.5%), against float64 SVD: random-start block 8 x 20 iterations under-estimated by up to
1.3e-3, 16 x 20 by 2.9e-5, 32 x 20 by 3.4e-6 (the fp32 floor; 32 x 50 the same)."""
NORM_CHECK_ITERS = 20
"""Iterations of the monitor's independent power iteration (see :data:`NORM_CHECK_BLOCK`)."""


@torch.no_grad()
def sampled_norm_errors(optimizer: Any, seed: int = 0) -> dict[str, float]:
    """Per kind, max ``| ||W||_2 / R - 1 |`` of the stored sphere modules by a block power
    iteration from a random start (generator seeded with ``seed``, so TP ranks agree), sharing
    nothing with the optimizer's cached block. Every rank of a TP group must call it (modules
    split over TP are gathered). Cost per module: ``2 x 32 x 20`` matrix-vector products."""
    from ...ops.power_iteration import block_power_iteration
    from ...ops.retraction import target_radius

    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(int(seed))
    for opt in sphere_optimizers(optimizer):
        cfg = opt.cfg
        if not cfg.on_sphere:
            continue
        by_shape: dict[tuple, list] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                layout = getattr(p, LAYOUT_ATTR)
                for mod in layout.modules:
                    full = opt._gather(mod.view(p.data).float().unsqueeze(0), mod, layout)[0]
                    by_shape.setdefault(tuple(full.shape), []).append((mod.kind, full))
        errors = []
        for (m, n), items in sorted(by_shape.items()):
            W = torch.stack([w for _, w in items])
            b = min(NORM_CHECK_BLOCK, m, n)
            V0 = torch.randn(len(items), n, b, generator=gen).to(W.device)
            sigma, *_ = block_power_iteration(W, NORM_CHECK_ITERS, b, V0=V0)
            radius = target_radius(m, n, cfg.radius_mode, cfg.radius_scaler)
            errors.append(((sigma / radius - 1.0).abs(), [k for k, _ in items]))
        if errors:
            values = torch.cat([e for e, _ in errors]).tolist()  # one read for the optimizer
            for kind, err in zip((k for _, ks in errors for k in ks), values):
                out[kind] = max(out.get(kind, 0.0), err)
    return out


def sphere_stats(optimizer: Any, norm_check_seed: Optional[int] = 0) -> dict[str, float]:
    """Flat ``{"sso/...": value}`` over every sphere member (empty without one).
    ``norm_check_seed=None`` skips the independent norm check (no ``norm_error`` keys)."""
    out: dict[str, float] = {}
    for opt in sphere_optimizers(optimizer):
        for key, value in opt.last_step_stats.items():
            name = f"sso/{key}"
            combine = max if key.startswith("max_") else (lambda a, b: a + b)
            out[name] = combine(out[name], value) if name in out else value
        for kind, vals in opt.kind_stats().items():
            out[f"sso/{kind}/start_norm_error"] = max(out.get(f"sso/{kind}/start_norm_error", 0.0),
                                                      vals["max_norm_error"])
            out[f"sso/{kind}/update_rms"] = vals["update_rms"]
    if norm_check_seed is not None:
        for kind, err in sampled_norm_errors(optimizer, norm_check_seed).items():
            out[f"sso/{kind}/norm_error"] = err
    if "sso/msign_calls" in out and out.get("sso/num_matrices"):
        out["sso/msign_calls_per_matrix"] = out["sso/msign_calls"] / out["sso/num_matrices"]
    return out


def write_stats(stats: dict[str, float], label: str, iteration: int, writer: Optional[Any] = None) -> dict[str, float]:
    """Write flat ``{"<prefix>/...": value}`` stats to ``writer`` (a TensorBoard
    ``SummaryWriter``) and one log line; returns them."""
    if writer is not None:
        for key, value in stats.items():
            writer.add_scalar(key, value, iteration)
    if stats:
        logger.info("iteration %d %s: %s", iteration, label,
                    " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in sorted(stats.items())))
    return stats


def log_sphere_stats(optimizer: Any, iteration: int, writer: Optional[Any] = None) -> dict[str, float]:
    """Write :func:`sphere_stats` to ``writer`` (a TensorBoard ``SummaryWriter``) and the log."""
    return write_stats(sphere_stats(optimizer, norm_check_seed=iteration), "sphere", iteration, writer)


@torch.no_grad()
def exact_norm_errors(optimizer: Any) -> dict[str, float]:
    """Per kind, max ``| ||W||_2 / R - 1 |`` over the stored modules, by exact SVD (tests and
    debugging: expensive). TP-sharded modules are gathered first. Muon-Hyperball: ``| ||W||_F /
    R - 1 |`` in float64 against the radius in its state (modules not stepped yet are left out)."""
    from ...ops.retraction import target_radius

    out: dict[str, float] = {}
    for opt in sphere_optimizers(optimizer):
        cfg = opt.cfg
        for group in opt.param_groups:
            for p in group["params"]:
                layout = getattr(p, LAYOUT_ATTR)
                for mod in layout.modules:
                    full = opt._gather(mod.view(p.data).float().unsqueeze(0), mod, layout)[0]
                    if cfg.on_hyperball:
                        cache = opt.state[p].get("sphere_cache")
                        radius = float(mod.view(cache)[0, 0]) if cache is not None else 0.0
                        if radius <= 0 and not float(opt.state[p].get("step", 0)) > 0:
                            continue  # not stepped yet: no radius
                        # a stepped module without its radius (lost in a copy or a load) is an error
                        err = abs(torch.linalg.matrix_norm(full.double()).item() / radius - 1) if radius > 0 else math.inf
                    else:
                        sigma = torch.linalg.matrix_norm(full.double(), ord=2).item()
                        err = abs(sigma / target_radius(*mod.full_shape, cfg.radius_mode, cfg.radius_scaler) - 1)
                    out[mod.kind] = max(out.get(mod.kind, 0.0), err)
    return out


def interval_logging_callback(stats_fn: Any, label: str, user_key: str):
    """A Megatron-Bridge ``Callback`` that logs ``stats_fn(optimizer)`` every
    ``logger.log_interval`` iterations to the TensorBoard writer (when configured) and the
    Python log, and keeps them in ``context.user_state[user_key]``."""
    from megatron.bridge.training.callbacks import Callback

    class IntervalLogging(Callback):
        def on_train_step_end(self, context) -> None:
            iteration = int(context.state.train_state.step) + 1  # incremented after the callbacks
            interval = max(1, int(context.state.cfg.logger.log_interval or 1))
            if iteration % interval == 0 and context.optimizer is not None:
                context.user_state[user_key] = write_stats(
                    stats_fn(context.optimizer), label, iteration, context.state.tensorboard_logger)

    return IntervalLogging()


def sphere_logging_callback():
    """:func:`interval_logging_callback` for :func:`sphere_stats` (``user_state["sso_stats"]``)."""
    return interval_logging_callback(sphere_stats, "sphere", "sso_stats")


def probe(context) -> dict:
    """A :func:`~.bridge_runner.run_pretrain` probe: the step's stats and the exact norm errors
    of the stored modules (every rank calls it, so the TP gathers line up)."""
    opts = sphere_optimizers(context.optimizer)
    return {"stats": sphere_stats(context.optimizer), "norm_errors": exact_norm_errors(context.optimizer),
            "lambda_tol": opts[0].cfg.lambda_tol if opts else None}
