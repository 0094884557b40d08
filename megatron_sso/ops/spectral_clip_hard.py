"""SPECTRA's hard spectral clip ``min(sigma, c)`` and its update multiplier (imports torch only).

The hard clip caps every singular value of an update (or a batch of them) at ``c`` through a
thin SVD; :func:`spectra_update_scale` is the ``sqrt(max(1, d_out/d_in))`` factor SPECTRA
multiplies every clipped update by. The matmul-only soft clip is in :mod:`.spectral_clip_soft`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .spectral_clip_checks import check_matrix, check_threshold

Tensor = torch.Tensor


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
    check_matrix(X, "hard_spectral_clip")
    cap = check_threshold(c, "hard_spectral_clip")
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

