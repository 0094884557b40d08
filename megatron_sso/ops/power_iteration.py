"""Top singular triple ``(sigma, u, v)`` of a matrix by (warm-started) power iteration.

SSO needs, per atomic module and per step, the spectral norm ``sigma = ||W||_2`` (to retract
``W`` onto its sphere) and the top singular pair ``u, v`` (``Theta = u v^T`` is the gradient
of ``||W||_2``). The paper keeps the vectors from the previous step ("cached singular
vectors"); the released code restarts from a vector of ones for 100 iterations. Weights move
by ``O(lr)`` per step, so a warm start from last step's ``v`` needs only a few iterations:
the optimizer uses many iterations on its first step and a few afterwards.

One iteration is ``u = W v / ||W v||``, ``v = W^T u / ||W^T u||``, and ``sigma = ||W^T u||``
from the last half-step. ``sigma`` never exceeds the true norm, and its relative error is
second order in the error of ``v``, so it converges much faster than the vectors do.

Tensor-parallel use: with ``partition_dim`` set (0: rows split, 1: columns split) ``W`` is
one shard, ``v0`` is the shard's slice of ``v`` if columns are split (else the full ``v``),
and ``allreduce`` sums over shards: one vector (the product that contracts the split
dimension) and one scalar (the squared norm of the split vector) per half-step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .newton_schulz import AllReduce
from .ritz import rotate_first_column, top_right_singular

Tensor = torch.Tensor

TINY = 1e-30
"""Floor for norms before division: a zero matrix yields sigma = 0 and zero u, not NaN."""

CHOL_SHIFT = 1e-7
"""Diagonal shift of the Cholesky-QR Gram, relative to its trace: keeps the factorisation
defined for a rank-deficient block (float32 round-off of the Gram is ~1e-7 of its trace)."""

CHOL_RESCUE_SHIFT = 1e-4
"""The shift tried, in the same batched factorisation, for a Gram whose round-off beat
:data:`CHOL_SHIFT` (a nearly rank-deficient block): selected on the device by the returned
``info``, so a failure costs no host read. Its columns then come out orthogonal up to ~1e-4
(the second Cholesky-QR pass shrinks that further) instead of the step stopping with an error."""


def default_start_vector(n: int, *, offset: int = 0, total: Optional[int] = None,
                         dtype: torch.dtype = torch.float32,
                         device: Optional[torch.device] = None) -> Tensor:
    """A fixed, non-degenerate unit start vector of length ``total`` (slice ``[offset, offset+n)``).

    A vector of ones (the reference's choice) is exactly orthogonal to the top singular
    vector of some structured matrices (any whose rows sum to zero); adding a cosine ripple
    with an irrational frequency removes that failure while staying deterministic and
    independent of the global RNG, and each shard can compute its own slice.
    """
    total = n if total is None else total
    if offset < 0 or offset + n > total:
        raise ValueError(f"slice [{offset}, {offset + n}) lies outside a vector of length {total}")
    j = torch.arange(total, dtype=torch.float64, device=device)
    vec = 1.0 + 0.5 * torch.cos(j * ((math.sqrt(5.0) - 1.0) * math.pi))
    vec = vec / vec.norm()
    return vec[offset:offset + n].to(dtype)


def _normalise(x: Tensor, allreduce: Optional[AllReduce]) -> tuple[Tensor, Tensor]:
    sq = x.square().sum(dim=-1, keepdim=True)
    if allreduce is not None:
        sq = allreduce(sq)
    norm = sq.sqrt()
    return x / norm.clamp_min(TINY), norm.squeeze(-1)


def _chol_orthonormalise(V: Tensor, allreduce: Optional[AllReduce]) -> Tensor:
    """Orthonormalise the columns of ``V`` (``(..., n, b)``) by Cholesky-QR, twice.

    Cholesky-QR needs only the small Gram ``V^T V`` (one all-reduce when ``V``'s rows are
    split across shards); repeating it once ("CholQR2") restores orthogonality to round-off.
    A tiny diagonal shift keeps the factorisation defined for rank-deficient blocks.

    No host synchronisation: ``torch.linalg.cholesky`` reads its ``info`` on the host to raise,
    so ``cholesky_ex(check_errors=False)`` factors ``G`` with :data:`CHOL_SHIFT` and with
    :data:`CHOL_RESCUE_SHIFT` in one batched call, and ``torch.where`` keeps, per matrix, the
    first that succeeded (the column norms, a diagonal factor, if neither did: non-finite input).
    """
    for _ in range(2):
        G = V.mT @ V
        if allreduce is not None:
            G = allreduce(G)
        eye = torch.eye(G.size(-1), dtype=G.dtype, device=G.device)
        scale = G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[..., None, None]
        shifted = torch.stack([G + (CHOL_SHIFT * scale) * eye, G + (CHOL_RESCUE_SHIFT * scale) * eye])
        Ls, info = torch.linalg.cholesky_ex(shifted, check_errors=False)
        ok = (info == 0)[..., None, None]
        diag = torch.diag_embed(shifted[1].diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt())
        L = torch.where(ok[0], Ls[0], torch.where(ok[1], Ls[1], diag))
        V = torch.linalg.solve_triangular(L, V.mT, upper=False).mT
    return V


def block_power_iteration(
    W: Tensor,
    iters: int = 50,
    block: int = 8,
    V0: Optional[Tensor] = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    allreduce: Optional[AllReduce] = None,
    partition_dim: Optional[int] = None,
    offset: int = 0,
    full_shape: Optional[tuple[int, int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top singular triple by subspace iteration on ``block`` vectors plus Rayleigh-Ritz.

    A single vector converges like ``(sigma_2 / sigma_1)^(2k)``: hopeless for a fresh
    Gaussian weight, whose top singular values are nearly equal, and for a weight on the
    sphere, whose spectrum SSO flattens so that the top direction can change from one step
    to the next. A block converges like ``(sigma_{b+1} / sigma_1)^(2k)``, and the
    Rayleigh-Ritz step picks the top pair exactly within the block.

    Args:
        W: ``(..., m, n)``.
        iters: subspace iterations (each: two block products and two orthonormalisations).
        block: block size ``b`` (capped by the matrix's dimensions).
        V0: warm start ``(..., n, b)`` (last call's returned block); ``None`` uses fixed
            deterministic cosine vectors.
        full_shape, offset: the unsharded ``(m, n)`` and a column-split shard's first column.

    Returns:
        ``sigma`` (``(...)``, fp32), ``u`` (``(..., m)``), ``v`` (``(..., n)``) and the
        orthonormal block ``(..., n, b)`` spanning the iterated subspace with column 0 ``v``
        (the other columns are not Ritz vectors: only the span matters for the next call's
        warm start), to warm-start the next call.
    """
    if W.dim() < 2:
        raise ValueError(f"block_power_iteration needs a matrix (..., m, n), got shape {tuple(W.shape)}")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"block power iteration count must be a non-negative integer, got {iters!r}")
    A = W.to(compute_dtype)
    n = A.size(-1)
    full_m, full_n = full_shape if full_shape is not None else (A.size(-2), n)
    b = max(1, min(int(block), full_m, full_n))
    rows_split = allreduce if partition_dim == 0 else None
    cols_split = allreduce if partition_dim == 1 else None
    if V0 is None:
        total = full_n if partition_dim == 1 else n
        cols = [default_start_vector(n, offset=offset, total=total, dtype=torch.float64, device=A.device)]
        j = torch.arange(offset, offset + n, dtype=torch.float64, device=A.device)
        for k in range(1, b):  # deterministic, linearly independent cosine ripples
            cols.append(torch.cos(j * (k + 1) * 0.7548776662466927 * math.pi + k))
        V = torch.stack(cols, dim=-1).to(compute_dtype).expand(A.shape[:-2] + (n, b))
    else:
        if V0.shape != A.shape[:-2] + (n, b):
            raise ValueError(f"V0 must have shape {tuple(A.shape[:-2] + (n, b))}, got {tuple(V0.shape)}")
        V = V0.to(compute_dtype)
    V = _chol_orthonormalise(V, cols_split)
    for _ in range(int(iters)):
        U = A @ V
        if cols_split is not None:
            U = cols_split(U)
        U = _chol_orthonormalise(U, rows_split)
        V = A.mT @ U
        if rows_split is not None:
            V = rows_split(V)
        V = _chol_orthonormalise(V, cols_split)
    # Rayleigh-Ritz: the small b x b matrix U^T A V holds the block's singular values.
    U = A @ V
    if cols_split is not None:
        U = cols_split(U)
    U = _chol_orthonormalise(U, rows_split)
    small = U.mT @ A @ V
    if allreduce is not None:
        small = allreduce(small)
    # The top pair of the b x b matrix without torch.linalg.svd, which waits for the device
    # on CUDA (:mod:`.ritz`); the block is rotated so that its first column is v.
    sigma, y = top_right_singular(small)
    us = (small.double() @ y.unsqueeze(-1)).squeeze(-1) / sigma.clamp_min(TINY).unsqueeze(-1)
    ritz_v = V @ rotate_first_column(y).to(compute_dtype)
    u = (U @ us.unsqueeze(-1).to(compute_dtype)).squeeze(-1)
    return sigma.float(), u, ritz_v[..., 0], ritz_v


def power_iteration(
    W: Tensor,
    v0: Optional[Tensor] = None,
    iters: int = 10,
    *,
    compute_dtype: torch.dtype = torch.float32,
    allreduce: Optional[AllReduce] = None,
    partition_dim: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate the top singular triple of ``W`` (shape ``(..., m, n)``).

    Args:
        W: matrix or batch of matrices.
        v0: start for the right singular vector, shape ``(..., n)`` (need not be unit);
            ``None`` uses :func:`default_start_vector`.
        iters: number of ``v -> u -> v`` iterations (>= 1).
        compute_dtype: dtype of the products (fp32 default; the paper suggests bf16).
        allreduce, partition_dim: tensor-parallel hooks, see the module docstring.

    Returns:
        ``sigma`` (shape ``(...)``, fp32), unit ``u`` (``(..., m)``) and unit ``v``
        (``(..., n)``) in ``compute_dtype``. For a zero matrix: ``sigma = 0``, ``u = 0`` and
        ``v`` is the start vector, so a cached ``v`` never collapses to zero.
    """
    if W.dim() < 2:
        raise ValueError(f"power_iteration needs a matrix (..., m, n), got shape {tuple(W.shape)}")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"power iteration count must be a positive integer, got {iters!r}")
    if (allreduce is None) != (partition_dim is None) or partition_dim not in (None, 0, 1):
        raise ValueError(f"partition_dim must be 0 or 1 together with allreduce, got {partition_dim!r}")
    A = W.to(compute_dtype)
    n = A.size(-1)
    if v0 is None:
        if partition_dim == 1:
            raise ValueError("a column-split power iteration needs its shard of v0")
        v0 = default_start_vector(n, dtype=compute_dtype, device=A.device).expand(A.shape[:-2] + (n,))
    elif v0.shape != A.shape[:-2] + (n,):
        raise ValueError(f"v0 must have shape {tuple(A.shape[:-2] + (n,))}, got {tuple(v0.shape)}")
    rows_split = allreduce if partition_dim == 0 else None
    cols_split = allreduce if partition_dim == 1 else None

    v_start, _ = _normalise(v0.to(compute_dtype), cols_split)
    v = v_start
    for _ in range(int(iters)):
        Wv = (A @ v.unsqueeze(-1)).squeeze(-1)
        if cols_split is not None:
            Wv = cols_split(Wv)
        u, _ = _normalise(Wv, rows_split)
        Wtu = (A.mT @ u.unsqueeze(-1)).squeeze(-1)
        if rows_split is not None:
            Wtu = rows_split(Wtu)
        v, sigma = _normalise(Wtu, cols_split)
    zero = (sigma <= TINY).unsqueeze(-1)
    v = torch.where(zero, v_start, v)
    return sigma.float(), u, v
