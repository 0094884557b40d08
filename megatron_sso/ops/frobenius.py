"""The Frobenius-norm ("hyperball") retraction of Muon-Hyperball, as pure batched tensor math.

Hyperball (Wen, Dang, Lyu, Ma & Liang, "Fantastic Pretraining Optimizers and Where to Find Them
II: Hyperball Optimization", arXiv 2606.16899) fixes the Frobenius norm of every weight matrix
*and* of its update, in place of weight decay:

    W <- R * normalize(W - lr * R * normalize(U)),      normalize(X) = X / ||X||_F,

with ``U`` the base optimizer's update (Muon's ``msign`` of the momentum) and ``R`` the matrix's
radius (the paper: its initial Frobenius norm). The step moves ``W`` by ``lr * R`` in Frobenius
norm before the retraction, so ``lr`` is a relative (angular) step: ``lr = 0.01`` turns a
matrix by about 0.01 rad whatever its shape or scale.

Every function works on ``(..., m, n)`` batches and takes an optional ``allreduce`` (the sum
over a tensor-parallel group) so that a shard of a matrix gets the norm of the whole matrix:
one scalar per matrix crosses the group for each norm.
"""

from __future__ import annotations

from typing import Optional

import torch

from .newton_schulz import AllReduce

Tensor = torch.Tensor

HYPERBALL_EPS = 1e-8
"""Floor of a norm we divide by (as Emerging-Optimizers' MuonHyperball, ``hyperball_eps``): a zero
update then leaves ``W`` at ``R normalize(W)``; a zero weight stays zero (it has no direction)."""


def frobenius_norm(X: Tensor, allreduce: Optional[AllReduce] = None) -> Tensor:
    """``||X||_F`` over the last two dimensions, in ``X``'s dtype; shards sum their squares
    over ``allreduce`` first (one value per matrix)."""
    sq = X.square().sum(dim=(-2, -1))
    if allreduce is not None:
        sq = allreduce(sq)
    return sq.sqrt()


def frobenius_retraction_factor(norm: Tensor, radius: Tensor, eps: float = HYPERBALL_EPS) -> Tensor:
    """The factor that takes a matrix of Frobenius norm ``norm`` to ``radius``: ``R / ||W||_F``,
    1 for a zero matrix (nothing to scale)."""
    return torch.where(norm > 0, radius / norm.clamp_min(eps), torch.ones_like(norm))


def hyperball_step_(W: Tensor, U: Tensor, radius: Tensor, lr: Tensor | float,
                    allreduce: Optional[AllReduce] = None, eps: float = HYPERBALL_EPS) -> Tensor:
    """``W <- R normalize(W - lr R normalize(U))`` in place, per matrix; returns ``W``.

    Args:
        W: ``(B, m, n)`` weights (fp32 or fp64), updated in place.
        U: ``(B, m, n)`` update directions (any scale: only their direction is used).
        radius: ``(B,)`` Frobenius radii ``R``.
        lr: the angular step, a float or a ``(B,)`` tensor (0 leaves a matrix at ``R normalize(W)``).
        allreduce: sum over the tensor-parallel group when ``W`` and ``U`` are shards.
    """
    B = W.size(0)
    lr_t = torch.as_tensor(lr, dtype=W.dtype, device=W.device).expand(B)
    u_norm = frobenius_norm(U.to(W.dtype), allreduce).clamp_min(eps)
    W.sub_((lr_t * radius / u_norm).view(B, 1, 1) * U.to(W.dtype))
    W.mul_(frobenius_retraction_factor(frobenius_norm(W, allreduce), radius, eps).view(B, 1, 1))
    return W
