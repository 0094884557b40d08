"""Muon-Hyperball: one step for a batch of same-shape matrices, and its plain reference.

Definition (Wen, Dang, Lyu, Ma & Liang, arXiv 2606.16899; NVIDIA Emerging-Optimizers ships it as
``MuonHyperball``): with Muon's update ``U = msign(M)`` of the (Nesterov) momentum,

    W <- R * normalize(W - lr * R * normalize(U)),   normalize(X) = X / ||X||_F,

and no weight decay (the retraction fixes the norm, so decay would be undone). Per atomic module
here, exactly as SSO (one Q head, one K / V group, gate and up halves, one expert), with the
momentum, Nesterov input and msign of the sphere family (:mod:`.sphere_update`), so Muon,
MuonSphere, SSO and Muon-Hyperball differ only in the constraint.

**The radius.** ``R = c ||W_0||_F`` with ``c`` = ``radius_scaler`` (default 1, the paper's) and
``W_0`` the module's weight at its first optimizer step, kept in the state (it must survive a
checkpoint: recomputing it from a resumed weight would be the same number only up to the
round-off the retraction leaves, and with ``c != 1`` not at all). We take the initial weight
rather than a muP formula because that is the paper's definition and because Megatron's
initialisation already carries the depth rules the paper's runs inherit (``init_method_std``,
the ``1/sqrt(2L)`` scaled output layers of ``linear_proj`` / ``linear_fc2``); a shape formula would
override them. ``c`` scales all of them together, which is the knob the comparison sweeps. The
first step also moves the weight onto its ball (a no-op for ``c = 1``).

**Why the update is normalised by its Frobenius norm.** ``lr R`` is then the step's Frobenius
length and ``lr`` a relative (angular) rate independent of shape, rank and msign's accuracy
(Muon's 5-step coefficients leave singular values in [0.68, 1.2]; a normalised update does not
see that). ``scale_mode`` is therefore not used.

A matrix whose gradient holds a NaN or Inf is left untouched (weight, momentum, radius) and
counted, as in the other sphere modes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.frobenius import frobenius_norm, hyperball_step_
from .config import SphereConfig
from .sphere_update import BatchStats, ShardHooks, momentum_input_, msign_for

Tensor = torch.Tensor


@dataclass
class HyperballBuffers:
    """Per-matrix state of a batch, updated in place: ``momentum`` ``(B, m, n)`` (a shard's,
    under TP) and ``radius`` ``(B,)``, the Frobenius radius ``R``, 0 until the first step sets
    it to ``c ||W_0||_F``."""

    momentum: Tensor
    radius: Tensor


@torch.no_grad()
def hyperball_update_(W: Tensor, G: Tensor, bufs: HyperballBuffers, cfg: SphereConfig, lr: float, *,
                      hooks: Optional[ShardHooks] = None, skip: Optional[Tensor] = None) -> BatchStats:
    """One Muon-Hyperball step for the batch ``W`` (``(B, m, n)``, fp32, updated in place).

    Args:
        W, G: weights and gradients (for a tensor-parallel shard: the local slices; ``hooks``
            then sums the Frobenius norms and msign's products over the group).
        bufs: momentum and radii, updated in place; a radius of 0 is set from ``W`` now.
        cfg: hyper-parameters (``mode`` must be ``hyperball``).
        lr: this step's angular learning rate (read from the param group).
        hooks: tensor-parallel reduction hooks, ``None`` on one process.
        skip: optional ``(B,)`` bool, matrices to leave untouched (what other ranks saw).

    Returns the batch's stats; ``sigma`` holds ``||W||_F / R`` of the weights the step started
    from (what the forward pass used), the Frobenius counterpart of the spectral modes' sigma.
    """
    if not cfg.on_hyperball:
        raise ValueError(f"hyperball_update_ needs mode='hyperball', got mode={cfg.mode!r}")
    if W.dim() != 3 or W.shape != G.shape:
        raise ValueError(f"W and G must be equal (B, m, n) tensors, got {tuple(W.shape)} and {tuple(G.shape)}")
    B = W.size(0)
    if skip is not None and skip.shape != (B,):
        raise ValueError(f"skip must have shape ({B},), got {tuple(skip.shape)}")
    allreduce = hooks.allreduce if hooks is not None else None
    finite, M = momentum_input_(G, bufs.momentum, cfg, hooks, skip)
    phi = msign_for(cfg, hooks)(M)
    norm = frobenius_norm(W, allreduce)
    cold = bufs.radius <= 0
    bufs.radius.copy_(torch.where(cold & finite, cfg.radius_scaler * norm.to(bufs.radius.dtype), bufs.radius))
    radius = bufs.radius.to(W.dtype)
    ratio = torch.where(radius > 0, norm / radius.clamp_min(torch.finfo(W.dtype).tiny), torch.ones_like(norm))
    before = W.clone()
    hyperball_step_(W, phi, radius, lr, allreduce)
    W.copy_(torch.where(finite.view(B, 1, 1), W, before))
    given = {"num_matrices": B, "msign_calls": B, "skipped": (~finite).sum(), "sigma": ratio}
    # the lambda solver's figures (residual, root, fallbacks, ...) are 0: there is no solve
    zeros = {f.name: torch.zeros((), device=W.device) for f in dataclasses.fields(BatchStats) if f.name not in given}
    return BatchStats(**given, **zeros)


@torch.no_grad()
def hyperball_reference_step(W: Tensor, G: Tensor, momentum: Tensor, radius: Optional[float],
                             cfg: SphereConfig, lr: float) -> tuple[Tensor, Tensor, float]:
    """The plain reference for one matrix, in the dtype given (float64 in the tests): returns
    ``(W_new, momentum_new, R)``. Written from the definition and independent of the fast path:
    ``msign`` is the exact polar factor ``P Q^T`` of an SVD, not Newton-Schulz."""
    m = cfg.momentum * momentum + (1 - cfg.momentum) * G
    M = (1 - cfg.momentum) * G + cfg.momentum * m if cfg.nesterov else m
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    U = P @ Qh
    R = cfg.radius_scaler * float(torch.linalg.matrix_norm(W)) if radius is None else radius
    stepped = W - lr * R * U / torch.linalg.matrix_norm(U)
    return R * stepped / torch.linalg.matrix_norm(stepped), m, R
