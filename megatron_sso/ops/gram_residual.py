"""``h(lambda)`` on the Gram side: two SSO evaluations for little more than one msign.

Work in the wide orientation ``Y`` (``r x c``, ``r <= c``; ``Y = M`` or ``M^T``) with the unit
vectors ``a`` (length ``r``) and ``b`` (length ``c``) of ``Theta = a b^T`` in that orientation.
For ``X = Y + lambda a b^T``:

* ``||X||_F^2 = ||Y||_F^2 + 2 lambda a^T Y b + lambda^2`` (a scalar),
* ``X X^T = Y Y^T + lambda (a w^T + w a^T) + lambda^2 a a^T`` with ``w = Y b`` (a rank-2 update),
* ``msign(X) = Q X / ||X||_F`` with ``Q`` from :func:`gram_newton_schulz` on the normalised Gram,
  so ``msign(X) = K Y + k b^T`` with ``K = Q / ||X||_F`` and ``k = lambda K a``,
* ``h = a^T msign(X) b = (K^T a) . w + a . k``.

So ``Y Y^T`` and ``w`` are formed once (``2 r^2 c`` and ``2 r c`` FLOPs), each evaluation costs
one small iteration (~60 r^3) and a few ``r^2`` products, and the answer — the tangent
interpolation of two evaluations, still of the form ``K Y + k b^T`` — needs one final
``K Y`` product. MuonSphere pays ``Y Y^T``, one iteration and ``K Y``; SSO adds one iteration.
Under tensor parallelism (columns of ``Y`` split) ``Y Y^T``, ``w`` and ``||Y||^2`` are
all-reduced once per step, not once per Newton-Schulz iteration.

A direction is represented by the pair ``(K, k)``; every operation the solvers need is linear
in it (:class:`megatron_sso.ops.lambda_solver.TangentResidual` documents the interface).
Precision: see :func:`gram_newton_schulz` (squared singular values in fp32).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .newton_schulz import NORM_EPS, AllReduce, gram_newton_schulz

Tensor = torch.Tensor
Rep = tuple[Tensor, Tensor]


def gram_side_is_small(M: Tensor, partition_dim: Optional[int]) -> bool:
    """Whether the Gram this evaluation would sum is the small side of ``M``'s shard.

    Unsharded, the wide orientation always makes it so. A shard must form its Gram over
    the split dimension; if that leaves the long side, the Gram is rank-deficient and its
    zero eigenvalues' round-off would be amplified, so callers use the standard path.
    """
    if partition_dim is None:
        return True
    rows, cols = (M.size(-1), M.size(-2)) if partition_dim == 0 else (M.size(-2), M.size(-1))
    return rows <= cols


def _mv(A: Tensor, x: Tensor) -> Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


class GramTangentResidual:
    """Drop-in for :class:`~megatron_sso.ops.lambda_solver.TangentResidual` (see module doc)."""

    def __init__(self, M: Tensor, u: Tensor, v: Tensor, table: Sequence[tuple[float, float, float]],
                 allreduce: Optional[AllReduce] = None, partition_dim: Optional[int] = None) -> None:
        if partition_dim is None:
            self.transpose = M.size(-2) > M.size(-1)
        else:
            self.transpose = partition_dim == 0  # the split dimension becomes Y's columns
        self.Y = (M.mT if self.transpose else M).float()
        self.a, self.b = ((v, u) if self.transpose else (u, v))
        self.a, self.b = self.a.float(), self.b.float()
        self.table = list(table)
        self.allreduce = allreduce
        reduce = allreduce if allreduce is not None else (lambda t: t)
        self.gram = reduce(self.Y @ self.Y.mT)
        self.w = reduce(_mv(self.Y, self.b))
        self.sq = reduce(self.Y.square().sum(dim=(-2, -1)))
        self.ab = (self.a * self.w).sum(-1)  # a^T Y b (a and w are full vectors)
        self.calls = 0
        # The solvers read these two as the matrix's own u and v (for shapes and bounds).
        self.M, self.u, self.v = M, u, v

    def __call__(self, lam: Tensor) -> tuple[Tensor, Rep]:
        lam = lam.float()
        nrm = (self.sq + 2 * lam * self.ab + lam * lam).clamp_min(0).sqrt() + NORM_EPS
        aw = self.a.unsqueeze(-1) * self.w.unsqueeze(-2)
        l2 = lam.unsqueeze(-1).unsqueeze(-1)
        G = self.gram + l2 * (aw + aw.mT) + l2 * l2 * (self.a.unsqueeze(-1) * self.a.unsqueeze(-2))
        G = G / (nrm * nrm).unsqueeze(-1).unsqueeze(-1)
        K = gram_newton_schulz(G, self.table) / nrm.unsqueeze(-1).unsqueeze(-1)
        rep = (K, lam.unsqueeze(-1) * _mv(K, self.a))
        self.calls += 1
        return self.inner(rep), rep

    def inner(self, rep: Rep) -> Tensor:
        K, k = rep
        return (_mv(K.mT, self.a) * self.w).sum(-1) + (self.a * k).sum(-1)

    @staticmethod
    def select(mask: Tensor, x: Rep, y: Rep) -> Rep:
        return (torch.where(mask.view(mask.shape + (1, 1)), x[0], y[0]),
                torch.where(mask.view(mask.shape + (1,)), x[1], y[1]))

    @staticmethod
    def combine(x: Rep, y: Rep, t: Tensor) -> Rep:
        return (x[0] + t.view(t.shape + (1, 1)) * (y[0] - x[0]),
                x[1] + t.view(t.shape + (1,)) * (y[1] - x[1]))

    def project(self, rep: Rep, h: Tensor) -> Rep:
        return rep[0], rep[1] - h.unsqueeze(-1) * self.a

    def materialise(self, rep: Rep) -> Tensor:
        K, k = rep
        phi = K @ self.Y + k.unsqueeze(-1) * self.b.unsqueeze(-2)
        return phi.mT if self.transpose else phi

    def cold_slope(self, rep: Rep) -> Tensor:
        """As :func:`~megatron_sso.ops.lambda_solver.cold_slope`, from Gram-side quantities:
        ``p = a^T (Y Y^T)^{1/2} a = a^T G K^T a`` and ``q = b^T (Y^T Y)^{1/2} b = (K w) . w``
        (at ``lambda = 0``, ``msign(Y) = K Y``)."""
        K, _ = rep
        p = (_mv(self.gram, self.a) * _mv(K, self.a)).sum(-1)
        q = (_mv(K, self.w) * self.w).sum(-1)
        return 1.0 / (p * q).clamp_min(1e-30).sqrt()
