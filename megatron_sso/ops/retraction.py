"""Radius and update-scale rules, the retraction onto the spectral sphere, and spectral muP init.

SSO keeps every atomic module ``W`` (``d_out x d_in``) on the sphere ``||W||_2 = R`` and moves
it by ``lr * s * Phi`` with ``||Phi||_2 = 1``. The radius ``R`` and the scale ``s`` depend only
on the module's shape; these rules are the ones the SSO authors' Megatron fork names
(``radius_mode`` / ``scale_mode``), with the paper's choice as default
(Xie et al., arXiv 2601.08393, §6.1: ``R = c * sqrt(d_out / d_in)`` with ``c = 1`` and
``s = sqrt(d_out / d_in)``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

Tensor = torch.Tensor

RadiusMode = Literal["spectral_mup", "identity"]
ScaleMode = Literal["spectral_mup", "shape_scaling", "align_adamw_rms", "identity"]
RetractMode = Literal["hard", "dynamic"]

ALIGN_ADAMW_RMS = 0.2
"""Moonlight's factor (Liu et al., "Muon is Scalable for LLM Training", 2025): an orthogonal
update scaled by ``0.2 * sqrt(max(d_out, d_in))`` has about the element RMS of an AdamW update,
so AdamW learning rates transfer."""


def _check_shape(d_out: int, d_in: int) -> None:
    if d_out < 1 or d_in < 1:
        raise ValueError(f"matrix dimensions must be positive, got d_out={d_out}, d_in={d_in}")


def target_radius(d_out: int, d_in: int, mode: RadiusMode = "spectral_mup", scaler: float = 1.0) -> float:
    """Sphere radius ``R`` for a ``d_out x d_in`` module.

    ``spectral_mup``: ``R = scaler * sqrt(d_out / d_in)`` (the spectral condition of Yang,
    Simon & Bernstein 2023: ``||W||_2 ~ sqrt(fan_out / fan_in)`` keeps activations Theta(1)).
    ``identity``: ``R = scaler``.
    """
    _check_shape(d_out, d_in)
    if not (scaler > 0 and math.isfinite(scaler)):
        raise ValueError(f"radius scaler must be positive and finite, got {scaler!r}")
    if mode == "spectral_mup":
        return scaler * math.sqrt(d_out / d_in)
    if mode == "identity":
        return float(scaler)
    raise ValueError(f"unknown radius mode {mode!r}; choose 'spectral_mup' or 'identity'")


def update_scale(d_out: int, d_in: int, mode: ScaleMode = "spectral_mup") -> float:
    """Multiplier ``s`` of the unit-spectral-norm direction for a ``d_out x d_in`` module.

    ``spectral_mup``: ``sqrt(d_out / d_in)`` (paper default); ``shape_scaling``:
    ``sqrt(max(1, d_out / d_in))`` (Muon's original rule); ``align_adamw_rms``:
    ``0.2 * sqrt(max(d_out, d_in))`` (see :data:`ALIGN_ADAMW_RMS`); ``identity``: 1.
    """
    _check_shape(d_out, d_in)
    if mode == "spectral_mup":
        return math.sqrt(d_out / d_in)
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, d_out / d_in))
    if mode == "align_adamw_rms":
        return ALIGN_ADAMW_RMS * math.sqrt(max(d_out, d_in))
    if mode == "identity":
        return 1.0
    raise ValueError(
        f"unknown scale mode {mode!r}; choose 'spectral_mup', 'shape_scaling', 'align_adamw_rms' or 'identity'"
    )


def retraction_factor(sigma: Tensor, radius: float, mode: RetractMode = "hard",
                      alpha: float = 0.0, lr: float = 0.0) -> Tensor:
    """The scalar (per matrix) that ``W`` is multiplied by to retract it.

    ``hard``: ``R / sigma``, so ``||W||_2 = R`` exactly afterwards.
    ``dynamic`` (paper App. A.3): ``1 - alpha*lr`` when ``sigma > R`` and ``1 + alpha*lr`` when
    ``sigma < R``; a gentle pull toward the sphere whose strength ``alpha`` plays the role of
    AdamW's weight decay.

    A zero matrix (``sigma == 0``) cannot be scaled onto a sphere: its factor is 1.
    """
    if mode == "hard":
        factor = radius / sigma.clamp_min(torch.finfo(torch.float32).tiny)
    elif mode == "dynamic":
        if not alpha >= 0:
            raise ValueError(f"dynamic retraction alpha must be >= 0, got {alpha!r}")
        factor = 1.0 - alpha * lr * torch.sign(sigma - radius)
    else:
        raise ValueError(f"unknown retraction mode {mode!r}; choose 'hard' or 'dynamic'")
    return torch.where(sigma > 0, factor, torch.ones_like(factor))


@torch.no_grad()
def spectral_mup_init_(W: Tensor, radius: Optional[float] = None, *,
                       radius_mode: RadiusMode = "spectral_mup", scaler: float = 1.0) -> Tensor:
    """Rescale ``W`` in place to spectral norm ``radius`` (spectral muP init, paper §4).

    ``radius`` defaults to :func:`target_radius` of ``W``'s shape. Uses the exact spectral
    norm (``torch.linalg.matrix_norm(ord=2)``): initialisation runs once, so accuracy wins.
    """
    if W.dim() != 2:
        raise ValueError(f"spectral_mup_init_ needs a 2-D weight, got shape {tuple(W.shape)}")
    if radius is None:
        radius = target_radius(W.size(0), W.size(1), radius_mode, scaler)
    sigma = torch.linalg.matrix_norm(W.double(), ord=2)
    if sigma > 0:
        W.mul_((radius / sigma).to(W.dtype))
    return W
