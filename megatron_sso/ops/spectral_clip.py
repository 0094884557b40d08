"""SPECTRA spectral clipping: the pure tensor math (imports torch only).

SPECTRA (Jiang, Semenov & Stich, arXiv 2603.14315, ICML 2026; SPEC §5) replaces the update
``U`` of a base optimiser (AdamW, Signum, AdEMAMix, ...) of every 2-D weight by a spectrally
clipped version before it is applied ("post-clipping", released defaults ``c = 5`` with a
cosine schedule, ``c = 10`` with WSD), and optionally clips raw 2-D gradients with
``c = 0.1`` before global-norm clipping ("pre-clipping"). Two clips are provided:

* :func:`hard_spectral_clip` -- every singular value ``sigma`` becomes ``min(sigma, c)``;
* :func:`soft_spectral_clip` -- ``sigma -> sigma / sqrt(1 + sigma^2 / c^2)``, i.e.
  ``H_c(X) = (I + X X^T / c^2)^(-1/2) X = X (I + X^T X / c^2)^(-1/2)``, computed without an
  SVD by a Newton-Schulz iteration on the small Gram side.

Units: ``c`` is a singular value, so it is in the units of ``X`` itself (an update, a
gradient); both clips return a tensor of ``X``'s shape, dtype and units whose singular vectors
are those of ``X``. The SPECTRA update multiplier is :func:`spectra_update_scale`.

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
lifts a small value ~8x in the first step and converges cubically at the end. Tables are in
:data:`SOFT_CLIP_COEFFICIENTS`; :func:`design_soft_clip_coefficients` regenerates them
(``tests/test_spectral_clip.py`` checks that it does).

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
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
AllReduce = Callable[[Tensor], Optional[Tensor]]
"""Sums a tensor over the shards of a tensor-parallel group, in place (returning ``None``
or the same tensor) or out of place (returning the sum)."""

__all__ = [
    "DEFAULT_SOFT_CLIP_STEPS",
    "SOFT_CLIP_COEFFICIENTS",
    "SOFT_CLIP_DESIGN",
    "design_soft_clip_coefficients",
    "hard_spectral_clip",
    "soft_spectral_clip",
    "spectra_update_scale",
]

DEFAULT_SOFT_CLIP_STEPS = 10
"""Iterations of the soft clip. SPECTRA uses "~10 Newton-Schulz steps" (SPEC §5); every
table below converges within 10 (float64 needs 10, float32 7, bf16/TF32 4; the rest are
cheap polishing steps that absorb round-off)."""

SOFT_CLIP_DESIGN: dict[str, tuple[float, float]] = {
    "float64": (2.0**-16, 1e-3),
    "float32": (2.0**-10, 1e-2),
    "lowp": (2.0**-4, 5e-2),
}
"""Per table, ``(ell, delta)``: the polynomials are designed for normalised singular values
of the implicit ``B`` (square roots of the eigenvalues of ``Y0``) in ``[ell, 1 + delta]``.

``ell = sqrt(phi_min)`` matches the spectral floor of the mode (``2^-32``, ``2^-20``,
``2^-8``), so every eigenvalue the floor allows is covered. ``delta`` is the headroom above
the upper bound ``s`` for round-off: 1% as Polar Express's 1.01 safety factor (float32),
5% for bf16/TF32 whose per-step round-off (``~sum|coef| * 2^-8``) is a few percent, 0.1% for
float64. The price is a residual error floor (7.7e-8, 9.1e-6, 7.8e-11 resp.)."""

# Generated by design_soft_clip_coefficients(ell, delta, 10) with SOFT_CLIP_DESIGN; the test
# suite regenerates them. Worst relative error after k steps (exact arithmetic) for
# normalised values in [ell, 1]:
#   float64: 1.0, 1.0, 1.0, .99, .96, .84, .50, 8.4e-2, 3.8e-4, 4.2e-10
#   float32: .99, .97, .87, .57, .13, 1.5e-3, 1.7e-7, 7.7e-8, 7.7e-8, 7.7e-8
#   lowp:    .62, .18, 5.6e-3, 1.7e-5, 9.1e-6, ... (9.1e-6 is the floor set by delta)
SOFT_CLIP_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "float64": (
        (8.505123564321591, -25.20340408523515, 18.671785634295226),
        (4.251743586506805, -3.149960453517819, 0.5834685512402187),
        (4.247992988021085, -3.147372410163521, 0.5831743188382272),
        (4.232133303945848, -3.136422213495623, 0.5819294256452382),
        (4.166297593605734, -3.0908528195619547, 0.5767492729989538),
        (3.9129445500324613, -2.913661832921923, 0.5566177095116047),
        (3.176004748056563, -2.377143716605942, 0.49591252457655793),
        (2.1913713015940326, -1.5670084829232294, 0.40671578364925975),
        (1.8815713751088994, -1.2563649932185332, 0.37482493440708703),
        (1.8740634278364139, -1.2481270678974954, 0.37406364047290097),
    ),
    "float32": (
        (8.387898668820458, -24.375203553387713, 17.729447643611685),
        (4.144664538802536, -3.0197372310371056, 0.5527736562481117),
        (3.9372858552965835, -2.878302313964936, 0.5371836445924395),
        (3.2982635937047817, -2.4277956266564997, 0.48775727492089627),
        (2.298506738233398, -1.6441770344376652, 0.4042715918704849),
        (1.8837121745087793, -1.2500371792310456, 0.3666679009417027),
        (1.8657018444740696, -1.2314566851004367, 0.3657549260845271),
        (1.8656976181125116, -1.2314645235354853, 0.36576682847338415),
        (1.8656976394974414, -1.2314645666482906, 0.3657668501951901),
        (1.8656976394970473, -1.2314645666475446, 0.365766850194838),
    ),
    "lowp": (
        (6.187268374897784, -14.988913920950028, 9.77202512407942),
        (2.3586231569602973, -1.6012367306087212, 0.355535211713609),
        (1.8665720151368144, -1.1920926070915858, 0.32856874895360333),
        (1.8299447045857073, -1.1612516410390108, 0.33131127320904313),
        (1.8298807954502934, -1.1613962259894157, 0.33150639609829213),
        (1.8298807516354096, -1.1613964750710954, 0.33150667249552335),
        (1.8298807515866886, -1.1613964753494466, 0.33150667280418095),
        (1.8298807515866211, -1.1613964753497312, 0.3315066728045127),
        (1.8298807515866433, -1.1613964753497736, 0.331506672804533),
        (1.8298807515866302, -1.1613964753497483, 0.3315066728045208),
    ),
}
"""Per-step ``(a, b, c)`` of ``p(x) = a x + b x^3 + c x^5``; a step past the end of a table
reuses its last triple (the fixed-point polishing polynomial)."""


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
_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


# --------------------------------------------------------------------------- validation


def _check_matrix(X: Tensor, who: str) -> None:
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{who}: X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() < 2:
        raise ValueError(
            f"{who}: X must be a matrix or a batch of matrices (..., m, n), got shape {tuple(X.shape)}"
        )
    if not X.is_floating_point():
        raise ValueError(f"{who}: X must have a floating dtype, got {X.dtype}")


def _check_threshold(c: Union[float, Tensor], who: str) -> float:
    if isinstance(c, torch.Tensor) and c.numel() == 1 and (c.is_floating_point() or c.dtype in _INT_DTYPES):
        value = float(c.item())
    elif isinstance(c, numbers.Real) and not isinstance(c, bool):
        value = float(c)
    else:
        raise ValueError(f"{who}: c must be a positive finite number, got {c!r}")
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{who}: c must be a positive finite number, got {c!r}")
    return value


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool):
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}")
    try:
        value = operator.index(steps)
    except TypeError:
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}") from None
    if value < 1:
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}")
    return value


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


# --------------------------------------------------------------------------- hard clip


def hard_spectral_clip(
    X: Tensor, c: Union[float, Tensor], *, compute_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Cap every singular value of ``X`` at ``c``: ``U min(S, c) V^T``.

    Computed from a batched thin SVD (``torch.linalg.svd``). A matrix whose singular values
    are all ``<= c`` is returned unchanged, bit for bit; otherwise the result is rebuilt as
    ``U min(S, c) V^T``, whose round-off is ``~u c`` (the form ``X - U relu(S - c) V^T``
    would cancel ``sigma_max`` against ``sigma_max - c`` and lose ``u sigma_max``).

    Why an SVD and not a Newton-Schulz formula: ``min(sigma, c)`` needs the *sign* of
    ``sigma - c`` (``min(sigma, c) = (sigma + c - |sigma - c|)/2``), i.e. a matrix sign of
    ``c^2 I - X^T X``, which is discontinuous at ``sigma = c``; polynomial iterations converge
    there only logarithmically in the gap and need ``X^T X`` to be resolved to relative
    accuracy near ``c^2``, which a float32 Gram cannot do for ``sigma_max/c`` in the hundreds.
    The SVD is exact to working precision for every spectrum, including rank-deficient ones.
    It is the slower clip on GPUs; SPECTRA's soft clip (:func:`soft_spectral_clip`) is the
    matmul-only one.

    Args:
        X: ``(..., m, n)``, any floating dtype; batched over leading dimensions.
        c: the cap, a positive finite number in the units of ``X``'s singular values.
        compute_dtype: float32 or float64 (default: float64 for float64 input, else float32;
            ``torch.linalg.svd`` has no bf16/fp16 kernels).

    Returns:
        A tensor of ``X``'s shape and dtype.
    """
    _check_matrix(X, "hard_spectral_clip")
    cap = _check_threshold(c, "hard_spectral_clip")
    if compute_dtype is None:
        compute_dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"hard_spectral_clip: compute_dtype must be torch.float32 or torch.float64, got {compute_dtype!r}"
        )
    if X.numel() == 0:
        return X.clone()
    Xc = X.to(compute_dtype)
    U, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    H = (U * S.clamp_max(cap).unsqueeze(-2)) @ Vh
    inside = (S[..., :1] <= cap).unsqueeze(-1)  # (..., 1, 1): nothing to clip
    return torch.where(inside, Xc, H).to(X.dtype)


# --------------------------------------------------------------------------- soft clip


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
    _check_matrix(X, "soft_spectral_clip")
    level = _check_threshold(c, "soft_spectral_clip")
    n_steps = _check_steps(steps)
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


# --------------------------------------------------------------------------- update scale


def spectra_update_scale(d_out: int, d_in: int) -> float:
    """SPECTRA's update multiplier ``sqrt(max(1, d_out / d_in))`` for a ``d_out x d_in`` weight.

    Released SPECTRA scripts scale the clipped update by this factor (SPEC §5); it is Muon's
    original shape rule, equal to ``update_scale(d_out, d_in, "shape_scaling")`` in
    :mod:`megatron_sso.ops.retraction`. Dimensionless; ``d_out, d_in`` are the weight's
    ``(rows, columns)`` in torch's ``Linear`` convention.
    """
    for name, value in (("d_out", d_out), ("d_in", d_in)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"spectra_update_scale: {name} must be a positive integer, got {value!r}")
    return math.sqrt(max(1.0, d_out / d_in))


# --------------------------------------------------------------------------- coefficient design


def _solve_small(M: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the 4x4 Remez system (Python floats)."""
    n = len(rhs)
    A = [list(row) + [rhs[i]] for i, row in enumerate(M)]
    for i in range(n):
        p = max(range(i, n), key=lambda k: abs(A[k][i]))
        A[i], A[p] = A[p], A[i]
        for k in range(i + 1, n):
            f = A[k][i] / A[i][i]
            for j in range(i, n + 1):
                A[k][j] -= f * A[i][j]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (A[i][n] - sum(A[i][j] * x[j] for j in range(i + 1, n))) / A[i][i]
    return x


def _minimax_odd_quintic(lo: float, hi: float, iters: int = 200) -> tuple[tuple[float, float, float], float]:
    """Best ``p(x) = a x + b x^3 + c x^5`` approximating 1 on ``[lo, hi]`` (Remez exchange).

    ``p - 1`` equioscillates at ``lo``, the two positive critical points of ``p`` and ``hi``
    (``x, x^3, x^5`` is a Chebyshev system on ``x > 0``, so these four points are the
    alternation set). Returns ``((a, b, c), E)`` with ``E`` the minimax error.
    """
    x1 = lo + (hi - lo) / 3.0
    x2 = lo + 2.0 * (hi - lo) / 3.0
    a = b = c = err = 0.0
    for _ in range(iters):
        pts = (lo, x1, x2, hi)
        signs = (-1.0, 1.0, -1.0, 1.0)
        a, b, c, err = _solve_small([[x, x**3, x**5, -s] for x, s in zip(pts, signs)], [1.0] * 4)
        disc = 9.0 * b * b - 20.0 * a * c
        if disc <= 0.0 or c == 0.0:
            raise RuntimeError(f"Remez exchange lost its alternation set on [{lo}, {hi}]")
        roots = sorted(((-3.0 * b - math.sqrt(disc)) / (10.0 * c), (-3.0 * b + math.sqrt(disc)) / (10.0 * c)))
        if roots[0] <= 0.0:
            raise RuntimeError(f"Remez exchange lost its alternation set on [{lo}, {hi}]")
        n1, n2 = math.sqrt(roots[0]), math.sqrt(roots[1])
        done = abs(n1 - x1) + abs(n2 - x2) <= 1e-15 * hi
        x1, x2 = n1, n2
        if done:
            break
    return (a, b, c), err


def design_soft_clip_coefficients(
    ell: float, delta: float, steps: int = DEFAULT_SOFT_CLIP_STEPS
) -> tuple[tuple[tuple[float, float, float], ...], tuple[float, ...]]:
    """Greedy minimax ("Polar Express", arXiv 2505.16932) quintics for ``[ell, 1]``.

    Step ``k`` takes the interval ``[lo_k, hi_k]`` the previous steps map ``[ell, 1]`` into
    (``[ell, 1]`` at first), designs the best odd quintic on ``[lo_k, (1 + delta) hi_k]``
    (``delta`` = headroom for round-off above the bound) and moves on to
    ``[p_k(lo_k), 1 + E_k]``. Pure Python floats; deterministic.

    Returns:
        ``(coefficients, errors)``: ``steps`` triples ``(a, b, c)`` and the worst relative
        error ``E_k`` of the normalised singular values after each step.
    """
    if not (0.0 < ell < 1.0) or not (0.0 <= delta < 1.0):
        raise ValueError(
            "design_soft_clip_coefficients: need 0 < ell < 1 and 0 <= delta < 1, "
            f"got ell={ell!r}, delta={delta!r}"
        )
    lo, hi = ell, 1.0
    coeffs: list[tuple[float, float, float]] = []
    errors: list[float] = []
    for _ in range(_check_steps(steps)):
        (a, b, c), err = _minimax_odd_quintic(lo, hi * (1.0 + delta))
        coeffs.append((a, b, c))
        errors.append(err)
        # Keep the next interval non-degenerate for the Remez solve once converged.
        lo = min(a * lo + b * lo**3 + c * lo**5, 1.0 - 1e-7)
        hi = 1.0 + err
    return tuple(coeffs), tuple(errors)
