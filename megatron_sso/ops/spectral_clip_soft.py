"""SPECTRA's soft spectral clip ``H_c(X) = (I + X X^T / c^2)^(-1/2) X``, single-process and
tensor-parallel (imports torch only).

Each singular value ``sigma`` becomes ``sigma / sqrt(1 + sigma^2 / c^2)``; singular vectors are
kept. Computed without an SVD by a coupled Newton-Schulz inverse-square-root iteration on the
small Gram side, with the per-step quintics of :mod:`.spectral_clip_coefficients`.

How the soft clip is computed
-----------------------------
Let ``A = I + K`` with ``K = X^T X / c^2`` (``n x n``; the ``X X^T`` side is the transpose of
the same computation and is used when it is smaller). ``A`` is the Gram matrix of the
augmented matrix ``B = [X / c ; I]``, whose polar factor is ``B A^(-1/2)``; its top block times
``c`` is exactly ``H_c(X)``. So the soft clip is the *polar factor of an implicit matrix*, and
the polar Newton-Schulz iteration ``B <- B h(B^T B)`` can be run on ``B = B_0 P`` by keeping
only the small factor ``P`` (``n x n``):

    R_k = P_k^T Y0 P_k,    T_k = a_k I + b_k R_k + c_k R_k^2,    P_{k+1} = P_k T_k,

where ``Y0 = A / s`` is ``A`` scaled into ``(0, 1]``. Every matrix is a polynomial in ``Y0``,
so ``P_k -> Y0^(-1/2)`` and ``H_c(X) = X P / sqrt(s)``. This is the coupled Newton-Schulz
inverse-square-root iteration (``Y <- Y T, Z <- T Z``; Higham, *Functions of Matrices*, SIAM
2008, ch. 6) with the coupled variable recomputed as ``Y_k Z_k = P_k^T Y0 P_k`` instead of
being carried: same cost (4 small matmuls per step), but the residual is measured against
the true ``Y0`` at every step, as in the explicit polar iteration, so round-off in ``P`` is
corrected instead of accumulated (measured in fp32: 5-10x smaller error than the carried form
for ``kappa(A) <= 1e3``), and a rounding error in ``R`` cannot persist as a negative eigenvalue
(a carried ``Y`` can drift into one, which then grows every step).

Why not the plain cubic ``T = (3I - ZY)/2`` with Frobenius scaling: on a spiky spectrum the
eigenvalues of ``Y0`` span ``[1/s, 1]`` with ``s`` up to ``1 + sigma_max^2/c^2`` (1e6 for
``sigma_max/c = 1000``) and the cubic lifts a small eigenvalue's ``sqrt`` by only 1.5x per
step, i.e. ~17 steps for 1e6 plus a few for accuracy. The per-step quintics used here are the
greedy minimax ("Polar Express") polynomials: step ``k`` is the odd quintic
``p(x) = a x + b x^3 + c x^5`` that best approximates 1 on the interval the previous steps
left (Amsel, Persson, Musco & Gower, "The Polar Express", arXiv 2505.16932, ICLR 2026); it
lifts a small value ~8x in the first step and converges cubically at the end. Tables and
their design: :mod:`.spectral_clip_coefficients`.

Precision: the spectral floor
-----------------------------
The smallest eigenvalues of ``Y0`` (the directions the soft clip leaves almost untouched,
``sigma << c``) are ``~1/s``. Forming the Gram in floating point perturbs them by about
``u * sqrt(m)`` (``u`` the unit round-off of the Gram dtype, ``m`` its inner dimension;
measured ``<= 0.2 u sqrt(m)``) and casting ``Y0`` to the compute dtype by about its ``u``.
Once that noise exceeds ``1/s`` an eigenvalue can turn negative, and a negative eigenvalue
makes any polynomial iteration diverge. The iteration therefore uses
``A_mu = mu I + K`` with ``mu = max(1, phi * s)``: the identity term is raised to the noise
floor ``phi`` (relative to ``s``) only when ``1/s`` is below it. ``mu = 1`` (the exact soft clip)
whenever ``s <= 1/phi``; beyond that, singular values with ``sigma^2/c^2 << phi * s`` come
out smaller than exact by up to ``sqrt(mu)`` -- exactly the directions whose eigenvalues the
Gram could no longer resolve anyway. ``phi`` per compute mode (see :data:`_RECIPES`):

* float64: ``2^-32`` (``= ell^2`` of its table; 10 steps reach 4e-10), i.e. exact up to
  ``s = 4.3e9`` (``sigma_max / c ~ 6.5e4``);
* float32: ``max(2^-20, 2^-24 sqrt(m))`` (16 ``u``, ``u = 2^-24``): exact up to ``s ~ 1e6``
  (``sigma_max / c ~ 1000``) for inner dimensions ``m <= 256``, ``s ~ 2.6e5`` at ``m = 4096``;
* float32 with TF32 matmuls enabled on CUDA: ``2^-8`` (8 ``u`` of TF32's ``2^-11``);
* bfloat16: ``2^-6`` (4 ``u``, ``u = 2^-8``): exact only up to ``s = 64``.

The Gram, its normalisation and ``Y0`` are always formed in at least float32 (float64 for
float64 compute); only the iteration and the final product run in ``compute_dtype``.

Measured accuracy (float64 SVD reference, ``tests/test_spectral_clip.py``), worst relative
error of a singular value, with ``kappa(A) = (1 + sigma_max^2/c^2) / (1 + sigma_min^2/c^2)``:
fp32 follows ``~0.1 u kappa(A)`` -- 3e-7 for ``kappa(A) <= 4``, 1.2e-5 at 2.5e3, 1e-3 at 2e5
(the "one singular value 100x the rest" spectrum at ``c = 0.1``); float64 ~1e-9; bf16 0.5-2%
for ``kappa(A) <= 4`` (the 2% where ``s > 64`` engages the bf16 floor), and no accuracy promise
for the small singular values beyond that (the output stays finite and inside the ball).

Tensor parallelism
------------------
With ``partition_dim`` set, ``X`` is one shard of a matrix split along its rows (0) or columns
(1) and ``allreduce`` sums a tensor over the shards. ``(I + X X^T/c^2)^(-1/2) X`` and
``X (I + X^T X/c^2)^(-1/2)`` are the same matrix, so the Gram is taken on the *unsplit* side,
where it is a sum of per-shard Grams: rows split -> ``X^T X`` (``n x n``), columns split ->
``X X^T`` (``m x m``). That Gram (float32, or float64 for float64 compute) is the *only*
reduction of a call; the bound, the floor and the whole iteration are then computed
identically on every rank from the reduced Gram, and each rank multiplies its own shard.
The floor uses the local inner dimension, so shards of equal size (Megatron always splits
evenly) give bit-identical iterations on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .spectral_clip_checks import AllReduce, check_matrix, check_steps, check_threshold
from .spectral_clip_coefficients import DEFAULT_SOFT_CLIP_STEPS, SOFT_CLIP_COEFFICIENTS

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Recipe:
    """How one compute mode runs: table, floor, Gram dtype."""

    table: str
    phi_min: float
    """Smallest spectral floor (relative to ``s``): 16 u (fp32), 8 u (TF32), 4 u (bf16) of the
    iteration dtype, or ``ell^2`` of the table (fp64), whichever the table needs."""
    gram_dtype: torch.dtype
    gram_unit_roundoff: float
    """``u`` of ``gram_dtype``; the floor also covers ``u * sqrt(m)``, the Gram's accumulation
    noise on its small eigenvalues (measured <= 0.2 u sqrt(m) for m up to 65536)."""


_RECIPES: dict[str, _Recipe] = {
    "float64": _Recipe("float64", 2.0**-32, torch.float64, 2.0**-53),
    "float32": _Recipe("float32", 2.0**-20, torch.float32, 2.0**-24),
    "tf32": _Recipe("lowp", 2.0**-8, torch.float32, 2.0**-24),
    "bfloat16": _Recipe("lowp", 2.0**-6, torch.float32, 2.0**-24),
}

_COMPUTE_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _tf32_matmuls(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` actually run in TF32 (10-bit mantissa)."""
    if device.type != "cuda":
        return False
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return True
    return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def _recipe_for(compute_dtype: torch.dtype, device: torch.device) -> _Recipe:
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            "soft_spectral_clip: compute_dtype must be torch.float32, torch.bfloat16 or "
            f"torch.float64, got {compute_dtype!r} (float16 is not supported: use bfloat16)"
        )
    name = _COMPUTE_DTYPES[compute_dtype]
    if name == "float32" and _tf32_matmuls(device):
        name = "tf32"
    return _RECIPES[name]


def _table(name: str, steps: int) -> list[tuple[float, float, float]]:
    table = SOFT_CLIP_COEFFICIENTS[name]
    return [table[min(i, len(table) - 1)] for i in range(steps)]



def _poly_step(R: Tensor, eye: Tensor, a: float, b: float, c: float) -> Tensor:
    """``a I + b R + c R^2`` as ``a I + R (b I + c R)`` (one matmul, fused where torch can)."""
    inner = torch.add(eye, R, alpha=c / b) if b != 0.0 else c * R
    scale = b if b != 0.0 else 1.0
    if R.dim() == 2:
        return torch.addmm(eye, R, inner, beta=a, alpha=scale)
    if R.dim() == 3:
        return torch.baddbmm(eye.expand_as(R), R, inner, beta=a, alpha=scale)
    return a * eye + scale * (R @ inner)


def soft_spectral_clip(
    X: Tensor,
    c: Union[float, Tensor],
    steps: int = DEFAULT_SOFT_CLIP_STEPS,
    compute_dtype: torch.dtype = torch.float32,
    allreduce: Optional[AllReduce] = None,
    partition_dim: Optional[int] = None,
) -> Tensor:
    """SPECTRA soft spectral clip ``H_c(X) = (I + X X^T / c^2)^(-1/2) X`` without an SVD.

    Each singular value ``sigma`` becomes ``sigma / sqrt(1 + sigma^2 / c^2)`` (about ``sigma``
    for ``sigma << c``, about ``c`` for ``sigma >> c``, never above either); singular vectors
    are kept. See the module docstring for the algorithm, its constants and its precision.

    Args:
        X: ``(..., m, n)``, any floating dtype; batched over leading dimensions. With
            ``partition_dim`` set, this rank's shard.
        c: the clip level, a positive finite number in the units of ``X``'s singular values
            (SPECTRA: 5 or 10 for post-clipping updates, 0.1 for pre-clipping gradients).
        steps: Newton-Schulz steps (default 10, enough for every compute dtype; fewer steps
            cover a narrower range, see :data:`SOFT_CLIP_COEFFICIENTS`).
        compute_dtype: dtype of the iteration and of the final product: torch.float32
            (default), torch.bfloat16 (cheaper; 0.5-2% for ``kappa(A) <= 4``, see the module
            docstring) or torch.float64. The Gram is always formed in float32 or better.
        allreduce: sums a tensor over the tensor-parallel shards (in place or returning the
            sum). Called exactly once per call, on this shard's Gram of ``X / c``
            (``(X/c)^T (X/c)`` for rows split, ``(X/c)(X/c)^T`` for columns split;
            ``(..., N, N)`` with ``N`` the unsplit size, contiguous, float32 -- float64 for
            float64 compute). Every rank must pass the same ``c``, ``steps`` and
            ``compute_dtype``. Needs ``partition_dim``.
        partition_dim: 0 if the matrix's rows (dim -2) are split across shards, 1 if its
            columns (dim -1) are; the Gram is then taken on the unsplit side. Without
            ``allreduce`` it just forces that side on an unsplit matrix (the computation a
            sharded run does, in one process).

    Returns:
        A tensor of ``X``'s shape and dtype. A zero matrix maps to zero.
    """
    check_matrix(X, "soft_spectral_clip")
    level = check_threshold(c, "soft_spectral_clip")
    n_steps = check_steps(steps)
    recipe = _recipe_for(compute_dtype, X.device)
    if partition_dim is not None and (isinstance(partition_dim, bool) or partition_dim not in (0, 1)):
        raise ValueError(
            "soft_spectral_clip: partition_dim must be 0 (rows split), 1 (columns split) or None, "
            f"got {partition_dim!r}"
        )
    if allreduce is not None and partition_dim is None:
        raise ValueError(
            "soft_spectral_clip: allreduce needs partition_dim (0: rows split, 1: columns split)"
        )
    if allreduce is not None and not callable(allreduce):
        raise ValueError(f"soft_spectral_clip: allreduce must be callable, got {type(allreduce).__name__}")

    # Orient so that the Gram is X^T X (the column side). Rows split -> X^T X is the summable
    # side as is; columns split -> work on X^T, whose rows are the split dimension.
    if partition_dim is None:
        transpose = X.size(-1) > X.size(-2)
    else:
        transpose = partition_dim == 1
    Xo = X.mT if transpose else X
    m, n = Xo.size(-2), Xo.size(-1)
    if n == 0:
        return X.clone()
    gd = recipe.gram_dtype

    # K = (X/c)^T (X/c): dividing before the product keeps the Gram in range whenever X/c is
    # (sigma/c up to ~1e19 in float32) and lets K ~ 0 underflow harmlessly when sigma << c.
    Xs = Xo.to(gd) * (1.0 / level)
    if allreduce is None:
        # One process: an exact power-of-two rescale alpha of matrices with max|X/c| > 2^40
        # keeps their Gram finite up to the dtype's range (K = G / alpha^2 below). A sharded
        # call cannot agree on alpha without a second reduction, so it keeps alpha = 1.
        big = Xs.abs().amax(dim=(-2, -1), keepdim=True)
        alpha = torch.where(big > 2.0**40, torch.exp2(-torch.ceil(torch.log2(big))), torch.ones_like(big))
        Xs = Xs * alpha
    else:
        alpha = torch.ones(Xs.shape[:-2] + (1, 1), dtype=gd, device=X.device)
    G = Xs.mT @ Xs  # (..., n, n), contiguous: what this shard contributes (alpha^2 K)
    if allreduce is not None:
        reduced = allreduce(G)
        if reduced is not None:
            if not isinstance(reduced, torch.Tensor) or reduced.shape != G.shape:
                raise ValueError(
                    "soft_spectral_clip: allreduce must return None or a tensor of the Gram's "
                    f"shape {tuple(G.shape)}, got {getattr(reduced, 'shape', type(reduced).__name__)}"
                )
            G = reduced.to(gd)
    K = (G + G.mT) * 0.5  # alpha^2 (X/c)^T (X/c), exactly symmetric

    # Upper bound b >= lambda_max(K): lambda_max^4 <= ||K^4||_F, so with Kh = K / ||K||_F,
    # b = ||K||_F ||Kh^4||_F^(1/4) overestimates by at most n^(1/8) (||K||_F alone: sqrt(n)).
    # Norms are taken after dividing by max|K| so that they neither overflow nor underflow.
    tiny = torch.finfo(gd).tiny
    amax = K.abs().amax(dim=(-2, -1), keepdim=True)
    Ka = K / amax.clamp_min(tiny)
    kfa = torch.linalg.matrix_norm(Ka)[..., None, None]  # ||K||_F / max|K|, in [1, n] (or 0)
    Kh = Ka / kfa.clamp_min(tiny)  # K / ||K||_F
    Kh4 = Kh @ Kh
    Kh4 = Kh4 @ Kh4
    ratio = torch.linalg.matrix_norm(Kh4)[..., None, None].pow(0.25).clamp_max(1.0)

    # Per-matrix scalars in float64 (they can exceed float32's range when sigma/c > 1e19).
    # Normaliser s and spectral floor mu (module docstring, "Precision"): the spectrum of
    # Y0 = (mu I + K)/s lies in [phi, 1], and mu = 1 (exact) whenever 1/s >= phi.
    phi = max(recipe.phi_min, recipe.gram_unit_roundoff * math.sqrt(max(m, 1)))
    inv_alpha2 = alpha.double().pow(-2)
    kf = amax.double() * kfa.double() * inv_alpha2
    bound = kf * ratio.double()
    s = torch.maximum(1.0 + bound, bound / (1.0 - phi))
    mu = torch.clamp(phi * s, min=1.0)
    eye_g = torch.eye(n, dtype=gd, device=X.device)
    Y0 = (Kh * (kf / s).to(gd) + eye_g * (mu / s).to(gd)).to(compute_dtype)

    eye = torch.eye(n, dtype=compute_dtype, device=X.device)
    table = _table(recipe.table, n_steps)
    P = _poly_step(Y0, eye, *table[0])  # P_0 = I, so R_0 = Y0 and P_1 = T_0
    for a, b, c3 in table[1:]:
        P = P @ _poly_step(P.mT @ (Y0 @ P), eye, a, b, c3)

    # H = X (mu I + K)^(-1/2) = (alpha X/c) P (c / (alpha sqrt(s))); both factors stay in range.
    H = Xs.to(compute_dtype) @ (P * (level / (alpha.double() * s.sqrt())).to(compute_dtype))
    if transpose:
        H = H.mT
    return H.to(X.dtype)

