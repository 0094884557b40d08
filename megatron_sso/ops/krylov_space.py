"""The block Krylov space that every ``h(lambda)`` of one SSO step shares.

Work in the wide orientation of the *full* matrix: ``Y`` is ``p x q`` with ``p <= q``
(``Y = M`` or ``M^T``), ``a`` the unit vector of ``Theta = a b^T`` on the short side, ``b`` on
the long side, ``w = Y b``. For ``X = Y + lambda a b^T`` (``||b|| = 1``)

    X X^T = G + lambda (a w^T + w a^T) + lambda^2 a a^T,   G = Y Y^T,
    h(lambda) = a^T msign(X) b = a^T (X X^T)^(-1/2) (w + lambda a),

so ``X X^T`` differs from ``G`` only inside ``span{a, w}`` and the block Krylov space
``K_k(G, [a, w])`` is the same for every ``lambda``. :func:`krylov_basis` builds an orthonormal
basis ``Q`` of it (``k`` products with ``G``, each two thin GEMMs with 2 right-hand sides) and
the projection ``T = Q^T G Q``; :mod:`megatron_sso.ops.krylov_lambda` solves for lambda on it.

Tensor parallelism. Each product ``G Z = Y (Y^T Z)`` needs one all-reduce of a thin block:

* ``Y``'s long side split (Megatron's layouts: column-parallel ``gate``/``up`` are tall and
  row-split, row-parallel ``down``/``proj`` are wide and column-split): the basis vectors are
  whole on every rank and ``Y (Y^T Z)`` is a sum of per-shard products: all-reduce ``p x 2``;
* ``Y``'s short side split: every rank holds its rows of the basis, ``Y^T Z`` is the sum
  (all-reduce ``q x 2``) and inner products of basis vectors are all-reduced too.

Orthogonalisation: classical Gram-Schmidt against all earlier vectors, twice ("twice is
enough", Giraud et al. 2005), then within the block. A column whose remainder falls below
:data:`DEFLATION_TOL` of its norm before orthogonalisation is noise (the space stopped
growing: rank-deficient ``M``, ``w`` parallel to ``a``, a zero matrix) and is set to zero;
zero columns add nothing to ``T`` and the projected vectors, so nothing is divided by them.
All shapes and iteration counts are fixed: no data-dependent control flow, no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .newton_schulz import AllReduce

Tensor = torch.Tensor

DEFLATION_TOL = 1e-5
"""Relative remainder below which a new basis column counts as dependent. fp32 round-off of a
product and two Gram-Schmidt passes leaves ~1e-7 relative (measured on rank-1 and rank-4
momenta: exhausted columns kept 3e-8 to 4e-7); 1e-5 keeps a 50x margin above it."""


@dataclass
class KrylovBasis:
    """An orthonormal basis of ``K_k(G, [a, w])`` and what the lambda model needs from it.

    ``T``, ``a_t``, ``w_t`` are float64 and identical on every tensor-parallel rank.
    """

    T: Tensor
    """``Q^T G Q`` (``(..., 2k, 2k)``, symmetrised)."""
    a_t: Tensor
    """``Q^T a`` (``(..., 2k)``)."""
    w_t: Tensor
    """``Q^T w`` (``(..., 2k)``)."""
    sq: Tensor
    """``||Y||_F^2`` per matrix (``(...)``)."""
    products: int
    """Products with ``G`` computed (``k``)."""


def krylov_blocks_for(p: int, blocks: int) -> int:
    """Block steps for a short side ``p``: ``min(ceil(p / 2), blocks)``; at ``ceil(p / 2)``
    the space is all of ``R^p`` and the model is exact."""
    return max(1, min(math.ceil(p / 2), int(blocks)))


def orient(M: Tensor, u: Tensor, v: Tensor, full_shape: tuple[int, int],
           partition_dim: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Optional[int]]:
    """``(Y, a, b, split)``: the wide orientation of the full matrix and which of ``Y``'s
    dimensions (0 rows, 1 columns, ``None``) is split across tensor-parallel shards."""
    transpose = full_shape[0] > full_shape[1]
    Y, a, b = (M.mT, v, u) if transpose else (M, u, v)
    split = None if partition_dim is None else (1 - partition_dim if transpose else partition_dim)
    return Y.float().contiguous(), a.float(), b.float(), split


def _mv(A: Tensor, x: Tensor) -> Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


class _Ops:
    """Products with ``G`` and inner products of basis vectors for one layout."""

    def __init__(self, Y: Tensor, allreduce: Optional[AllReduce], split: Optional[int]) -> None:
        self.Y = Y
        self.ar = allreduce if split is not None else None
        self.split = split

    def reduce(self, x: Tensor, when: bool) -> Tensor:
        return self.ar(x) if when and self.ar is not None else x

    def gram_product(self, Z: Tensor) -> Tensor:
        """``G Z`` for a ``(..., p, c)`` block: one all-reduce of a thin block."""
        if self.split == 0:  # short side split: sum Y^T Z over the row shards
            return self.Y @ self.reduce(self.Y.mT @ Z, True)
        return self.reduce(self.Y @ (self.Y.mT @ Z), self.split == 1)

    def dots(self, A: Tensor, B: Tensor) -> Tensor:
        """``A^T B`` of basis blocks (summed over row shards when the basis is split)."""
        return self.reduce(A.mT @ B, self.split == 0)


def _orthonormalise(Z: Tensor, Q: Tensor, ops: _Ops) -> Tensor:
    """Columns of ``Z`` made orthonormal to ``Q`` and to each other; dependent ones -> 0."""
    ref = ops.dots(Z, Z).diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    for _ in range(2):
        Z = Z - Q @ ops.dots(Q, Z)
    cols = []
    for c in range(Z.size(-1)):
        z = Z[..., c:c + 1]
        for _ in range(2):
            for q in cols:
                z = z - q * ops.dots(q, z)
            z = z - Q @ ops.dots(Q, z)
        nrm = ops.dots(z, z).clamp_min(0).sqrt()
        keep = nrm > DEFLATION_TOL * ref[..., c:c + 1].unsqueeze(-1)
        cols.append(torch.where(keep, z / torch.where(keep, nrm, torch.ones_like(nrm)), torch.zeros_like(z)))
    return torch.cat(cols, dim=-1)


def krylov_basis(Y: Tensor, a: Tensor, b: Tensor, k: int, allreduce: Optional[AllReduce] = None,
                 split: Optional[int] = None) -> KrylovBasis:
    """Block Krylov basis of ``G = Y Y^T`` from ``[a, Y b]`` with ``k`` block steps.

    Args:
        Y: ``(..., p, q)`` in the wide orientation (a shard of it under tensor parallelism).
        a, b: ``(..., p)`` and ``(..., q)`` unit vectors (their local slices when split).
        k: block steps; the basis has ``2k`` columns (zero columns where it stopped growing).
        allreduce, split: the tensor-parallel hook and the split dimension of ``Y``.
    """
    ops = _Ops(Y, allreduce, split)
    w = _mv(Y, b)
    sq = Y.square().sum(dim=(-2, -1))
    if split == 1:  # Y b and ||Y||^2 are sums over the column shards: one all-reduce
        both = allreduce(torch.cat([w, sq.unsqueeze(-1)], dim=-1))
        w, sq = both[..., :-1], both[..., -1]
    elif split == 0:
        sq = allreduce(sq)
    p = Y.size(-2)
    Q = torch.zeros(Y.shape[:-2] + (p, 2 * k), dtype=Y.dtype, device=Y.device)
    GQ = torch.zeros_like(Q)
    Z = torch.stack([a, w], dim=-1)
    for j in range(k):
        Z = _orthonormalise(Z, Q, ops)
        Q = torch.cat([Q[..., :2 * j], Z, Q[..., 2 * j + 2:]], dim=-1)
        Z = ops.gram_product(Z)
        GQ = torch.cat([GQ[..., :2 * j], Z, GQ[..., 2 * j + 2:]], dim=-1)
    start = ops.dots(Q, torch.stack([a, w], dim=-1)).double()
    T = ops.dots(Q, GQ).double()
    return KrylovBasis(T=0.5 * (T + T.mT), a_t=start[..., 0], w_t=start[..., 1], sq=sq.double(), products=k)
