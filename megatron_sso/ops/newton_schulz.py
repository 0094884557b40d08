"""Matrix sign (polar factor) by Newton-Schulz iteration.

``msign(X) = U V^T`` for the thin SVD ``X = U S V^T``: every non-zero singular value is
mapped to 1 and the singular vectors are kept. It is the steepest-descent direction under
the spectral norm, so Muon, MuonSphere and SSO all spend most of their time here.

The iteration works on the *wide* orientation (rows <= columns) so that the Gram matrix
``A = X X^T`` is the small side, after dividing ``X`` by its Frobenius norm so that every
singular value lies in ``(0, 1]``. One step is the odd quintic

    X <- a X + (b A + c A^2) X,        A = X X^T,

which maps each singular value ``s`` to ``a s + b s^3 + c s^5``.

Coefficient sets (name -> per-step ``(a, b, c)``):

* ``"sso8"``: the 8 per-step triples of the Spectral Sphere paper's released scripts
  (Xie et al., arXiv 2601.08393, §6.1; reproduced in SPEC §2). The first steps have large
  slopes that lift tiny singular values quickly; the last step, (1.875, -1.25, 0.375), is the
  classical cubic-to-quintic Newton-Schulz fixed point whose derivative at 1 is zero.
* ``"muon5"``: the single triple (3.4445, -4.7750, 2.0315) that Muon repeats five times
  (K. Jordan, "Muon: An optimizer for hidden layers", 2024). It converges only to
  singular values in roughly [0.7, 1.2]; it is the Muon baseline, not SSO's default.

A step index past the end of a set reuses the set's last triple.

Tensor-parallel use: with ``partition_dim`` set, ``X`` is one shard of a matrix split along
rows (0) or columns (1), and ``allreduce`` sums a tensor over the shards. The Gram matrix is
then formed on the *unsplit* side (the only side whose Gram is a sum of per-shard Grams),
the two reductions per call are the Frobenius norm (a scalar per matrix) and one Gram per
iteration, and every other operation is local. The polynomial is the same on either side,
so the sharded result equals the single-process one up to fp32 round-off.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the shards of a tensor-parallel group and returns the sum."""

COEFFICIENT_SETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sso8": (
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ),
    "muon5": ((3.4445, -4.7750, 2.0315),),
}

CoefficientName = Literal["sso8", "muon5"]

DEFAULT_STEPS: dict[str, int] = {"sso8": 8, "muon5": 5}
"""Number of steps each set was designed for (8 in the SSO paper, 5 in Muon)."""

NORM_EPS = 1e-7
"""Added to the Frobenius norm before dividing by the callers that normalise a momentum whose
norm is ~1 (``optim.sphere_update``, ``ops.gram_residual``), so that a zero matrix maps to zero.
:func:`msign` does not use it: added to a small norm it shrinks the input (at ||X||_F = 1e-12 the
result had spectral norm 0.018 instead of 1), so :func:`frobenius_normalise` divides exactly."""

_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}


def resolve_coefficients(
    coefficients: Union[str, Sequence[Sequence[float]]], steps: Optional[int]
) -> list[tuple[float, float, float]]:
    """Return the ``steps`` per-step ``(a, b, c)`` triples for a named or explicit set.
    Anything else (``None``, a number, malformed triples) is a ValueError naming the set names."""
    names = sorted(COEFFICIENT_SETS)
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(
                f"unknown Newton-Schulz coefficient set {coefficients!r}; "
                f"choose one of {names}"
            )
        table = COEFFICIENT_SETS[coefficients]
        if steps is None:
            steps = DEFAULT_STEPS[coefficients]
    else:
        try:
            table = tuple(tuple(float(x) for x in t) for t in coefficients)
        except (TypeError, ValueError):
            table = ()
        if not table or any(len(t) != 3 for t in table):
            raise ValueError(f"Newton-Schulz coefficients must be a set name (one of {names}) or a "
                             f"sequence of (a, b, c) triples, got {coefficients!r}")
        if steps is None:
            steps = len(table)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"msign steps must be a positive integer, got {steps!r}")
    return [table[min(i, len(table) - 1)] for i in range(int(steps))]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"msign compute dtype must be one of {sorted(map(str, _DTYPES))}, got {dtype}")


def _fused_add_matmul(C: Tensor, A: Tensor, B: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta * C + alpha * (A @ B)`` in one fused kernel where torch has one (2-D, 3-D)."""
    if C.dim() == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    if C.dim() == 3:
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    return beta * C + alpha * (A @ B)


def gram_newton_schulz(G: Tensor, table: Sequence[tuple[float, float, float]]) -> Tensor:
    """The left factor ``Q`` with ``msign(X) = Q X`` from the normalised Gram ``G = X X^T``.

    Every Newton-Schulz iterate is ``X_k = Q_k X`` with ``Q_k`` a polynomial of ``G``, so the
    iteration can run on the small side alone: ``P_k = a I + b A_k + c A_k^2``,
    ``Q_{k+1} = P_k Q_k``, ``A_{k+1} = P_k A_k P_k`` (``A_k = X_k X_k^T``; all commute). Cost
    per step ~8 r^3 for an ``r x r`` Gram instead of ``4 r^2 c + 2 r^3`` on the ``r x c`` matrix,
    plus one ``Q X`` at the end: a win for wide matrices (``c > ~2 r``), and under tensor
    parallelism one all-reduce of ``G`` replaces one per step. The price is precision: ``A_k``
    holds squared singular values, so in fp32 the smallest ones lose digits (measured against
    the SVD: 2e-6 relative for flat spectra, 4e-4 for 1/k spectra; standard NS: 2e-6).
    ``A`` is re-symmetrised every step so round-off cannot drive it non-symmetric.
    """
    eye = torch.eye(G.size(-1), dtype=G.dtype, device=G.device)
    Q = None
    A = G
    for i, (a, b, c) in enumerate(table):
        P = a * eye + b * A + c * (A @ A)
        Q = P if Q is None else P @ Q
        if i + 1 < len(table):
            A = P @ (P @ A)
            A = 0.5 * (A + A.mT)
    return Q


def frobenius_normalise(Y: Tensor, allreduce: Optional[AllReduce] = None) -> Tensor:
    """``Y / ||Y||_F`` for each matrix of ``Y`` (last two dims), in ``Y``'s dtype; zero stays zero.

    Exact for every finite input, however small. The sum of squares is taken in float64: in
    float32 an entry below ~1e-19 squares to a subnormal or to zero, so the norm of a matrix of
    such entries comes out wrong or 0; float64 squares stay normal down to the smallest float32
    subnormal (1.4e-45 -> 2e-90). The reciprocal is applied as two equal factors
    ``||Y||_F^-1/2`` because ``1/||Y||_F`` alone overflows float32 (and bfloat16) once
    ``||Y||_F < 2.9e-39``, and float16 far sooner; each factor stays within range. Under tensor
    parallelism ``allreduce`` sums the float64 sums of squares (one scalar per matrix, 8 bytes).
    """
    sq = torch.linalg.vector_norm(Y, dim=(-2, -1), keepdim=True, dtype=torch.float64).square()
    if allreduce is not None:
        sq = allreduce(sq)
    norm = sq.sqrt()
    half = torch.where(norm > 0, norm, torch.ones_like(norm)).rsqrt().to(Y.dtype)
    return Y * half * half


MsignMethod = Literal["standard", "gram"]


def msign(
    X: Tensor,
    steps: Optional[int] = None,
    coefficients: Union[CoefficientName, Sequence[Sequence[float]]] = "sso8",
    *,
    compute_dtype: torch.dtype = torch.float32,
    allreduce: Optional[AllReduce] = None,
    partition_dim: Optional[int] = None,
    method: MsignMethod = "standard",
) -> Tensor:
    """Approximate ``U V^T`` of ``X`` (shape ``(..., m, n)``) by Newton-Schulz.

    Args:
        X: matrix or batch of matrices; any floating dtype.
        steps: iterations; default is the set's own count (8 for ``sso8``, 5 for ``muon5``).
        coefficients: a set name from :data:`COEFFICIENT_SETS` or explicit triples.
        compute_dtype: dtype of the iteration (fp32 by default; the paper's released code
            uses bf16, which shifts ``h(lambda)`` by ~1e-3, see SPEC §2 "Precision").
        allreduce: sums partial results over tensor-parallel shards (see module docstring).
        partition_dim: 0 or 1, the dimension of the full matrix that is split; required
            together with ``allreduce``.
        method: ``standard`` iterates on ``X``; ``gram`` iterates on its small Gram matrix
            (:func:`gram_newton_schulz`: faster for wide matrices, less precise). A shard whose
            summable Gram is the *large* side (rank-deficient) runs ``standard`` instead.

    Returns:
        A tensor of ``X``'s shape and dtype.
    """
    if X.dim() < 2:
        raise ValueError(f"msign needs a matrix (..., m, n), got shape {tuple(X.shape)}")
    _check_dtype(compute_dtype)
    if (allreduce is None) != (partition_dim is None):
        raise ValueError(
            f"allreduce and partition_dim go together (got partition_dim={partition_dim!r}, "
            f"allreduce={'set' if allreduce is not None else None})"
        )
    if partition_dim not in (None, 0, 1):
        raise ValueError(f"partition_dim must be 0, 1 or None, got {partition_dim!r}")
    table = resolve_coefficients(coefficients, steps)

    out_dtype = X.dtype
    Y = X.to(compute_dtype)
    if partition_dim is None:
        transpose = Y.size(-2) > Y.size(-1)
    else:
        # Rows split (0): the summable Gram is Y^T Y, so work on the transpose, where the
        # split dimension becomes the columns and the Gram is Y Y^T over full rows.
        transpose = partition_dim == 0
    if transpose:
        Y = Y.mT
    Y = frobenius_normalise(Y, allreduce)
    if method == "gram" and Y.size(-2) <= Y.size(-1):
        G = Y @ Y.mT
        if allreduce is not None:
            G = allreduce(G)
        Y = gram_newton_schulz(G, table) @ Y
        return (Y.mT if transpose else Y).to(out_dtype)
    if method not in ("standard", "gram"):
        raise ValueError(f"unknown msign method {method!r}; choose 'standard' or 'gram'")
    for a, b, c in table:
        A = Y @ Y.mT
        if allreduce is not None:
            A = allreduce(A)
        Y = _fused_add_matmul(Y, _fused_add_matmul(A, A, A, b, c), Y, a, 1.0)
    if transpose:
        Y = Y.mT
    return Y.to(out_dtype)
