"""AdEMAMix: Adam with a second, slow gradient EMA mixed into the numerator.

AdEMAMix (Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv 2409.03137, 2024) observes that one EMA cannot both react quickly (small ``beta``) and
keep using old gradients (``beta`` near 1), and keeps two:

    m1 <- beta1 m1 + (1 - beta1) g                  (fast, bias-corrected)
    m2 <- beta3(t) m2 + (1 - beta3(t)) g            (slow, not bias-corrected)
    nu <- beta2 nu + (1 - beta2) g^2                (Adam's second moment)
    D  = (m1 / (1 - beta1^t) + alpha(t) m2) / (sqrt(nu / (1 - beta2^t)) + eps)
    W  <- (1 - lr wd) W - lr D                      (decoupled decay, as AdamW)

``t = 1, 2, ...`` counts this parameter's steps. A slow EMA with ``beta3 = 0.9999`` (half-life
~6900 steps) is mostly stale gradients early in training, which destabilises it, so the paper
warms both ``alpha`` and ``beta3`` up over ``T_alpha`` and ``T_beta3`` steps (its eq. for the
schedulers; the authors set both to the total number of training steps):

* ``alpha(t) = min(t alpha / T_alpha, alpha)`` -- linear from 0;
* ``beta3(t) = min(exp(ln(beta1) ln(beta3) / ((1 - t/T) ln(beta3) + (t/T) ln(beta1))), beta3)``
  -- linear in the EMA's *half-life* ``ln(0.5) / ln(beta)`` from ``beta1``'s to ``beta3``'s
  (``1 / ln(beta3(t))`` is the linear interpolation of ``1 / ln(beta1)`` and ``1 / ln(beta3)``).
  We evaluate it in half-life form, which is the same function and also covers ``beta1 = 0``
  (half-life 0). The authors' reference code adds 1e-8 inside the logarithm; we do not.

As in :mod:`megatron_sso.optim.signum`, a functional core (:func:`ademamix_init_state`,
:func:`ademamix_direction_`) returns the per-unit-lr direction ``D`` without weight decay (what
SPECTRA clips), and :class:`AdEMAMix` is a thin per-parameter for-loop over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from .direction_optimizer import ConfigFields, DirectionOptimizer

Tensor = torch.Tensor

ADEMAMIX_STATE_KEYS = ("step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
"""Per-parameter state: steps taken (``int``), ``m1``, ``m2`` and ``nu`` (param shape and dtype)."""


@dataclass(frozen=True)
class AdEMAMixConfig(ConfigFields):
    """Hyper-parameters of AdEMAMix (the learning rate lives in the param group).

    Defaults are those of the authors' reference usage example (github.com/apple/ml-ademamix,
    README: ``betas=(0.9, 0.999, 0.9999)``, ``alpha=8``, ``weight_decay=0.1``, warm-ups equal
    to the number of training iterations), which is the paper's LLM setting.
    """

    beta1: float = 0.9
    """Fast EMA coefficient (paper: 0.9, Adam's ``beta1``)."""

    beta2: float = 0.999
    """Second-moment EMA coefficient (paper: 0.999, Adam's default ``beta2``)."""

    beta3: float = 0.9999
    """Final slow EMA coefficient (paper: 0.9999, half-life ~6900 steps)."""

    alpha: float = 8.0
    """Final weight of the slow EMA in the numerator (authors' example: 8; their code's
    signature default is 2, bitsandbytes uses 5). Larger ``alpha`` leans more on old gradients."""

    eps: float = 1e-8
    """Added to ``sqrt(nu_hat)`` (paper and Adam: 1e-8)."""

    weight_decay: float = 0.1
    """Decoupled weight decay ``wd`` in ``W <- (1 - lr wd) W`` (authors' example: 0.1)."""

    alpha_warmup: Optional[int] = None
    """``T_alpha``: steps over which ``alpha(t)`` rises linearly from 0; ``None`` = no warm-up
    (constant ``alpha``). The authors use the total number of training steps."""

    beta3_warmup: Optional[int] = None
    """``T_beta3``: steps over which ``beta3(t)`` moves from ``beta1`` to ``beta3`` linearly in
    half-life; ``None`` = no warm-up. The authors use the total number of training steps."""

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2", "beta3"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (0.0 <= value < 1.0):
                raise ValueError(f"AdEMAMix {name} must be in [0, 1), got {value!r}")
        for name in ("alpha", "eps", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"AdEMAMix {name} must be a finite number >= 0, got {value!r}")
        for name in ("alpha_warmup", "beta3_warmup"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"AdEMAMix {name} must be None or a positive integer, got {value!r}")


def ademamix_alpha(step: int, cfg: AdEMAMixConfig) -> float:
    """``alpha(t) = min(t alpha / T_alpha, alpha)`` (constant ``alpha`` without warm-up)."""
    if cfg.alpha_warmup is None or step >= cfg.alpha_warmup:
        return cfg.alpha
    return step * cfg.alpha / cfg.alpha_warmup


def _half_life(beta: float) -> float:
    """Steps for an EMA weight to halve, ``ln(0.5) / ln(beta)`` (0 for ``beta = 0``)."""
    return 0.0 if beta == 0.0 else math.log(0.5) / math.log(beta)


def ademamix_beta3(step: int, cfg: AdEMAMixConfig) -> float:
    """``beta3(t)``: linear in half-life from ``beta1`` (t = 0) to ``beta3`` (t >= T_beta3)."""
    if cfg.beta3_warmup is None or step >= cfg.beta3_warmup:
        return cfg.beta3
    a = step / cfg.beta3_warmup
    half_life = (1.0 - a) * _half_life(cfg.beta1) + a * _half_life(cfg.beta3)
    beta = 0.0 if half_life == 0.0 else 0.5 ** (1.0 / half_life)
    return min(beta, cfg.beta3)


def ademamix_init_state(p: Tensor) -> dict[str, Any]:
    """Fresh state for parameter ``p``: step 0 and three zero buffers of ``p``'s shape and dtype."""
    state: dict[str, Any] = {"step": 0}
    for key in ADEMAMIX_STATE_KEYS[1:]:
        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def ademamix_direction_(grad: Tensor, state: dict[str, Any], cfg: AdEMAMixConfig) -> Tensor:
    """Advance the state by one step and return the direction ``D`` (a new tensor).

    The step the optimiser takes is ``W <- (1 - lr wd) W - lr D``; ``D`` excludes ``lr`` and the
    weight decay so that a caller (SPECTRA) can transform it before applying it.
    """
    m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
    g = grad.to(m1.dtype)
    state["step"] += 1
    t = state["step"]
    beta3 = ademamix_beta3(t, cfg)
    m1.mul_(cfg.beta1).add_(g, alpha=1.0 - cfg.beta1)
    m2.mul_(beta3).add_(g, alpha=1.0 - beta3)
    nu.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
    denom = (nu / (1.0 - cfg.beta2**t)).sqrt_().add_(cfg.eps)
    numer = torch.add(m1 / (1.0 - cfg.beta1**t), m2, alpha=ademamix_alpha(t, cfg))
    return numer.div_(denom)


class AdEMAMix(DirectionOptimizer):
    """AdEMAMix (Pagliardini et al., 2024) with decoupled weight decay, for any parameter shape.

    Args:
        params: tensors or param groups (a group may override any keyword below).
        lr: learning rate (> 0); 1e-3 as in the authors' example (Adam's default step size).
        **config: any :class:`AdEMAMixConfig` field (``beta1``, ``beta2``, ``beta3``, ``alpha``,
            ``eps``, ``weight_decay``, ``alpha_warmup``, ``beta3_warmup``).
    """

    config_cls = AdEMAMixConfig
    init_state = staticmethod(ademamix_init_state)
    direction = staticmethod(ademamix_direction_)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **config: Any) -> None:
        unknown = set(config) - set(AdEMAMixConfig.field_names())
        if unknown:
            raise ValueError(f"unknown AdEMAMix option(s) {sorted(unknown)}; "
                             f"valid: {sorted(AdEMAMixConfig.field_names())}")
        super().__init__(params, lr, AdEMAMixConfig(**config))
