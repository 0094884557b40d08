"""The functional core: one sphere-family step for a batch of same-shape matrices.

Everything here works in place on fp32 tensors shaped ``(B, m, n)`` (``B`` atomic modules of
one shape, stacked or viewed), so the same code serves the standalone optimizer, the
data-parallel sharded optimizer and, through the ``allreduce`` / ``partition_dim`` hooks, a
tensor-parallel shard of each matrix. Per matrix and step (SPEC §2):

1. momentum ``m <- beta m + (1 - beta) g``; input ``M = (1 - beta) g + beta m`` (Nesterov) or ``m``;
   ``M_hat = M / ||M||_F``;
2. (sphere modes) ``sigma, u, v`` from the cached block of right singular vectors
   (block power iteration with Rayleigh-Ritz, see :func:`block_power_iteration`);
3. retraction ``W <- (R / sigma) W`` (or the dynamic nudge);
4. (SSO) ``lambda*`` with ``u^T msign(M_hat + lambda* u v^T) v = 0``; ``Phi`` is that msign;
   (MuonSphere, Muon) ``Phi = msign(M_hat)``;
5. ``W <- W - lr * s * Phi`` (Muon also decays ``W`` by ``1 - lr * wd``);
6. (sphere modes) refine the cached block on the new ``W`` and, with hard retraction, retract
   again, so that the stored weight (what the next forward pass sees) is on the sphere. The
   paper retracts only at the start of a step; the stored weight then sits up to ``lr * s``
   off the sphere (a flattened spectrum lets another direction grow past ``R``). Retracting
   at the end too changes nothing else: the next step's retraction becomes a no-op.

A matrix whose gradient holds a NaN or Inf is left untouched (weight, momentum and caches)
and counted in the stats; the others in the batch still step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from ..ops.lambda_solver import (
    LambdaSolution,
    TangentResidual,
    initial_slope,
    lambda_bound,
    solve_lambda_bisect,
    solve_lambda_secant,
)
from ..ops.gram_residual import GramTangentResidual, gram_side_is_small
from ..ops.krylov_lambda import solve_lambda_krylov
from ..ops.newton_schulz import NORM_EPS, AllReduce, msign, resolve_coefficients
from ..ops.power_iteration import block_power_iteration
from ..ops.retraction import retraction_factor
from .config import SphereConfig

Tensor = torch.Tensor


@dataclass
class SphereBuffers:
    """Per-matrix optimizer state of a batch, each shaped ``(B, ...)`` and updated in place.

    ``right_block`` (``(B, n, b)``, Ritz vectors, column 0 the top right singular vector)
    is ``None`` until the first sphere step fills it; ``lam`` and ``slope``
    are the last root and secant slope of the lambda solver, valid once ``lambda_warm`` (a
    host-side flag, so the solver's evaluation count is fixed without reading the device).
    """

    momentum: Tensor
    right_block: Optional[Tensor]
    lam: Tensor
    slope: Tensor
    lambda_warm: bool = False

    @classmethod
    def from_states(cls, states: list[dict]) -> "SphereBuffers":
        """Stack per-matrix state dicts (see :func:`init_sphere_state`) into batch buffers."""
        has_block = "right_block" in states[0]
        return cls(
            momentum=torch.stack([s["momentum_buffer"] for s in states]),
            right_block=torch.stack([s["right_block"] for s in states]) if has_block else None,
            lam=torch.stack([s["lambda"] for s in states]),
            slope=torch.stack([s["slope"] for s in states]),
            lambda_warm=states[0]["lambda_warm"],
        )

    def store_(self, states: list[dict]) -> None:
        """Write the batch buffers back into the per-matrix state dicts."""
        for i, s in enumerate(states):
            s["momentum_buffer"].copy_(self.momentum[i])
            if self.right_block is not None:
                if "right_block" in s:
                    s["right_block"].copy_(self.right_block[i])
                else:
                    s["right_block"] = self.right_block[i].clone()
            s["lambda"].copy_(self.lam[i])
            s["slope"].copy_(self.slope[i])
            s["lambda_warm"] = self.lambda_warm


def init_sphere_state(state: dict, shape: tuple[int, int], device: torch.device,
                      full_shape: Optional[tuple[int, int]] = None) -> dict:
    """Fill an empty per-matrix state dict: fp32 momentum of ``shape`` (a shard's, under TP),
    lambda 0, a slope guess for the full matrix (replaced by the first solve) and the cold
    flag; the singular-vector block comes with the first step."""
    if not state:
        m, n = full_shape if full_shape is not None else shape
        state["momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=device)
        state["lambda"] = torch.zeros((), dtype=torch.float32, device=device)
        state["slope"] = torch.full((), initial_slope(m, n), dtype=torch.float32, device=device)
        state["lambda_warm"] = False
    return state


@dataclass
class BatchStats:
    """What one batch step measured; tensors stay on the device until someone reads them."""

    num_matrices: int
    msign_calls: int
    max_abs_h: Tensor
    max_abs_lambda: Tensor
    skipped: Tensor
    fallbacks: Optional[Tensor] = field(default=None)
    sigma: Optional[Tensor] = field(default=None)
    above_tol: Optional[Tensor] = field(default=None)
    """Matrices whose best evaluated ``|h|`` (``max_abs_h``'s figure) stayed above ``lambda_tol``."""


@dataclass(frozen=True)
class ShardHooks:
    """How a tensor-parallel shard reaches its peers: ``allreduce`` sums over the group and
    ``partition_dim`` names the split dimension of the full ``(m, n)`` matrix."""

    allreduce: AllReduce
    partition_dim: int
    offset: int = 0
    """Index of this shard's first row (``partition_dim=0``) or column (1) in the full matrix."""


def _frobenius(M: Tensor, hooks: Optional[ShardHooks]) -> Tensor:
    sq = M.square().sum(dim=(-2, -1))
    if hooks is not None:
        sq = hooks.allreduce(sq)
    return sq.sqrt()


def _finite_mask(G: Tensor, hooks: Optional[ShardHooks], skip: Optional[Tensor] = None) -> Tensor:
    bad = (~torch.isfinite(G)).flatten(-2).any(dim=-1).float()
    if skip is not None:  # e.g. a non-finite gradient seen on another data-parallel rank
        bad = bad + skip.to(device=bad.device, dtype=bad.dtype)
    if hooks is not None:
        bad = hooks.allreduce(bad)  # one shard's NaN must stop every shard of that matrix
    return bad == 0


def momentum_input_(G: Tensor, momentum: Tensor, cfg: SphereConfig, hooks: Optional[ShardHooks],
                    skip: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The first half of every mode's step: update ``momentum`` in place (``m <- beta m + (1-beta) g``,
    only where the gradient is finite and not skipped, so a bad matrix keeps its state) and return
    ``(finite, M_hat)``: the ``(B,)`` mask of matrices to update and the Frobenius-normalised Nesterov
    (or plain) momentum, the input of msign (SPEC §2, step 1)."""
    B = G.size(0)
    finite = _finite_mask(G, hooks, skip)
    f3 = finite.view(B, 1, 1)
    G = torch.where(f3, G.float(), torch.zeros((), dtype=torch.float32, device=G.device))
    beta = cfg.momentum
    momentum.copy_(torch.where(f3, torch.lerp(momentum, G, 1.0 - beta), momentum))
    M = torch.lerp(momentum, G, 1.0 - beta) if cfg.nesterov else momentum.clone()
    return finite, M / (_frobenius(M, hooks) + NORM_EPS).view(B, 1, 1)


def msign_for(cfg: SphereConfig, hooks: Optional[ShardHooks]):
    """``msign`` with ``cfg``'s steps, coefficients, dtype and method, over ``hooks``' TP group."""
    return partial(msign, steps=cfg.msign_steps, coefficients=cfg.msign_coefficients,
                   compute_dtype=cfg.msign_torch_dtype, allreduce=hooks.allreduce if hooks is not None else None,
                   partition_dim=hooks.partition_dim if hooks is not None else None, method=cfg.msign_method)


def _residual(cfg: SphereConfig, M: Tensor, u: Tensor, v: Tensor, msign_fn,
              hooks: Optional[ShardHooks]):
    """The evaluation ``lambda -> (h, direction)`` for the configured msign method."""
    allreduce = hooks.allreduce if hooks is not None else None
    pdim = hooks.partition_dim if hooks is not None else None
    if cfg.msign_method == "gram" and gram_side_is_small(M, pdim):
        table = resolve_coefficients(cfg.msign_coefficients, cfg.msign_steps)
        return GramTangentResidual(M, u, v, table, allreduce, pdim)
    return TangentResidual(M, u, v, msign_fn, allreduce, pdim)


def _solve(cfg: SphereConfig, make_residual, M: Tensor, u: Tensor, v: Tensor, bufs: SphereBuffers,
           full_shape: tuple[int, int], warm: bool) -> LambdaSolution:
    m, n = full_shape
    if cfg.lambda_solver == "bisect":
        sols = []
        for i in range(M.size(0)):
            sols.append(solve_lambda_bisect(make_residual(M[i], u[i], v[i]), cfg.lambda_tol, cfg.lambda_max_iter))
        return LambdaSolution(
            lam=torch.stack([s.lam for s in sols]).float(),
            h=torch.stack([s.h for s in sols]),
            phi=torch.stack([s.phi for s in sols]),
            slope=bufs.slope,
            calls=sum(s.calls for s in sols),
        )
    if warm:
        lam0 = bufs.lam
        slope0 = bufs.slope
        evals, extra = cfg.lambda_evals, cfg.lambda_tol_evals
    else:
        lam0 = torch.zeros_like(bufs.lam)
        slope0 = None
        evals, extra = cfg.lambda_cold_evals, cfg.lambda_cold_tol_evals
    extra = extra if evals > 1 else 0  # one evaluation projects; it has no bracket to refine
    sol = solve_lambda_secant(make_residual(M, u, v), lam0, slope0, evals, bound=lambda_bound(m, n),
                              tol=cfg.lambda_tol, tol_evals=extra)
    sol.calls = (evals + extra) * M.size(0)
    return sol


def _solve_krylov(cfg: SphereConfig, msign_fn, M: Tensor, u: Tensor, v: Tensor, bufs: SphereBuffers,
                  full_shape: tuple[int, int], hooks: Optional[ShardHooks]) -> LambdaSolution:
    """lambda on the shared Krylov space, then one msign (:mod:`megatron_sso.ops.krylov_lambda`);
    Newton starts at last step's root once warm."""
    lam0 = bufs.lam if bufs.lambda_warm else torch.zeros_like(bufs.lam)
    sol = solve_lambda_krylov(M, u, v, msign_fn, lam0, blocks=cfg.krylov_blocks, bound=lambda_bound(*full_shape),
                              full_shape=full_shape, allreduce=hooks.allreduce if hooks is not None else None,
                              partition_dim=hooks.partition_dim if hooks is not None else None,
                              table=resolve_coefficients(cfg.msign_coefficients, cfg.msign_steps))
    sol.calls = M.size(0)
    return sol


@torch.no_grad()
def sphere_update_(
    W: Tensor,
    G: Tensor,
    bufs: SphereBuffers,
    cfg: SphereConfig,
    lr: float,
    radius: float,
    scale: float,
    *,
    full_shape: Optional[tuple[int, int]] = None,
    hooks: Optional[ShardHooks] = None,
    skip: Optional[Tensor] = None,
) -> BatchStats:
    """One step for the batch ``W`` (``(B, m, n)``, fp32, updated in place) with gradient ``G``.

    Args:
        W, G: weights and gradients (for a tensor-parallel shard: the local slices).
        bufs: the batch's state, updated in place.
        cfg: hyper-parameters.
        lr: learning rate of this step (read from the param group: schedulers rewrite it).
        radius, scale: ``R`` and ``s`` of the full matrix shape.
        full_shape: ``(m, n)`` of the full matrix (defaults to ``W``'s).
        hooks: tensor-parallel reduction hooks, ``None`` on one process.
        skip: optional ``(B,)`` bool, matrices to leave untouched as if their gradient were
            non-finite (a distributed caller passes what other ranks saw). It is OR-ed with the
            local check *before* the shards' reduction, so all shards agree.
    """
    if cfg.on_hyperball:  # its radius is per-module state: see megatron_sso.optim.hyperball
        raise ValueError("sphere_update_ does not run mode='hyperball'; use optim.hyperball.hyperball_update_")
    if W.dim() != 3 or W.shape != G.shape:
        raise ValueError(f"W and G must be equal (B, m, n) tensors, got {tuple(W.shape)} and {tuple(G.shape)}")
    full_shape = full_shape or (W.size(-2), W.size(-1))
    allreduce = hooks.allreduce if hooks is not None else None
    pdim = hooks.partition_dim if hooks is not None else None
    B = W.size(0)

    if skip is not None and skip.shape != (B,):
        raise ValueError(f"skip must have shape ({B},), got {tuple(skip.shape)}")
    finite, M = momentum_input_(G, bufs.momentum, cfg, hooks, skip)
    msign_fn = msign_for(cfg, hooks)
    zero = torch.zeros(B, device=W.device)
    sigma = None
    max_abs_h = zero
    max_abs_lambda = zero
    fallbacks = torch.zeros((), device=W.device)
    above_tol = torch.zeros((), device=W.device)
    # The start block lives on the columns (v): only a column split offsets it; a row-split
    # shard holds all columns, so its start block is the full one (offset 0).
    power = partial(block_power_iteration, block=cfg.power_block, compute_dtype=cfg.power_torch_dtype,
                    allreduce=allreduce, partition_dim=pdim,
                    offset=hooks.offset if hooks is not None and pdim == 1 else 0, full_shape=full_shape)
    if cfg.on_sphere:
        if bufs.right_block is None:
            sigma, u, v, block = power(W, cfg.power_iters_cold)
            bufs.right_block = block.float().clone()
        else:
            # The cached block was refined on this very weight at the end of the last step:
            # one product gives sigma and u (and retracts anything that moved W since).
            sigma, u, v, block = power(W, 0, V0=bufs.right_block)
        factor = retraction_factor(sigma, radius, cfg.retract, cfg.retract_alpha, lr)
        W.mul_(torch.where(finite, factor, torch.ones_like(factor)).view(B, 1, 1))
        if cfg.mode == "sso" and full_shape == (1, 1):
            # A 1x1 sphere is two points: its tangent space is {0}, h is a step function
            # with no root, and the exact SSO direction is 0 (lambda* = -M makes X = 0).
            phi = torch.zeros_like(M)
            bufs.lam.copy_(torch.where(finite, -M.view(B), bufs.lam))
            calls = 0
        elif cfg.mode == "sso":
            make_residual = partial(_residual, cfg, msign_fn=msign_fn, hooks=hooks)
            if cfg.lambda_solver == "krylov":
                sol = _solve_krylov(cfg, msign_fn, M, u.float(), v.float(), bufs, full_shape, hooks)
            else:
                sol = _solve(cfg, make_residual, M, u.float(), v.float(), bufs, full_shape, bufs.lambda_warm)
            bufs.lambda_warm = cfg.lambda_solver in ("secant", "krylov")
            phi = sol.phi
            bufs.lam.copy_(torch.where(finite, sol.lam, bufs.lam))
            bufs.slope.copy_(torch.where(finite, sol.slope, bufs.slope))
            # the solver's accuracy: |h| of the best msign it really evaluated (the applied,
            # interpolated or projected direction has h = 0 by construction)
            h_raw = sol.h_raw if sol.h_raw is not None else sol.h.abs()
            max_abs_h = torch.where(finite, h_raw, zero)
            above_tol = (max_abs_h > cfg.lambda_tol).sum()
            max_abs_lambda = torch.where(finite, sol.lam.abs(), zero)
            if sol.fallback is not None:
                fallbacks = (sol.fallback & finite).sum()
            calls = sol.calls
        else:
            phi = msign_fn(M)
            calls = B
    else:
        phi = msign_fn(M)
        calls = B
        if cfg.weight_decay > 0:
            W.mul_(torch.where(finite.view(B, 1, 1), 1.0 - lr * cfg.weight_decay, 1.0))
    coef = torch.where(finite, lr * scale, 0.0).view(B, 1, 1)
    W.sub_(coef * phi.float())
    if cfg.on_sphere:
        # Refine the cached block on the updated weight (warm, a few iterations); with hard
        # retraction also put the weight back on the sphere now, so that the forward pass
        # always sees ||W||_2 = R (the next step's retraction is then a no-op).
        sigma2, _, _, block2 = power(W, cfg.power_iters, V0=bufs.right_block)
        bufs.right_block.copy_(torch.where(finite.view(B, 1, 1), block2.float(), bufs.right_block))
        if cfg.retract == "hard" and cfg.retract_after_update:
            factor2 = retraction_factor(sigma2, radius, "hard")
            W.mul_(torch.where(finite, factor2, torch.ones_like(factor2)).view(B, 1, 1))
    return BatchStats(
        num_matrices=B,
        msign_calls=calls,
        max_abs_h=max_abs_h.max(),
        max_abs_lambda=max_abs_lambda.max(),
        skipped=(~finite).sum(),
        fallbacks=fallbacks,
        sigma=sigma,
        above_tol=above_tol,
    )
