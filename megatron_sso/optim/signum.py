"""Signum: the sign of the momentum, with decoupled weight decay.

Signum (Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for
Non-Convex Problems", ICML 2018, arXiv 1802.04434) keeps one EMA of the gradient and steps by
its elementwise sign:

    m <- beta m + (1 - beta) g,        W <- (1 - lr wd) W - lr sign(m).

Every entry of the step has magnitude ``lr`` (or 0 where ``m`` is exactly 0: ``sign(0) = 0``,
the convention of ``torch.sign``), so the step's RMS is ``lr`` whatever the gradient's scale,
like Adam's normalised step. ``momentum = 0`` gives plain signSGD. The weight decay is
decoupled and scaled by ``lr`` (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
ICLR 2019) -- the form SPECTRA's Frank-Wolfe reading needs (``docs/spectra.md``).

The code is split as everywhere in :mod:`megatron_sso.optim`: a functional core
(:func:`signum_init_state`, :func:`signum_direction_`) that updates the state and returns the
per-unit-lr direction ``D = sign(m)`` *without* weight decay -- exactly what SPECTRA clips
(:mod:`megatron_sso.optim.spectra`) -- and a thin ``torch.optim`` class that applies
``W <- (1 - lr wd) W - lr D``. The class is a plain per-parameter for-loop: it is the
reference, not a fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .direction_optimizer import ConfigFields, DirectionOptimizer

Tensor = torch.Tensor

SIGNUM_STATE_KEYS = ("step", "momentum_buffer")
"""Per-parameter state: the number of steps taken (``int``) and the momentum ``m`` (param shape
and dtype)."""


@dataclass(frozen=True)
class SignumConfig(ConfigFields):
    """Hyper-parameters of Signum (the learning rate lives in the param group)."""

    momentum: float = 0.9
    """EMA coefficient ``beta`` of ``m <- beta m + (1 - beta) g``. 0.9: the usual heavy-ball value,
    and the default of MXNet's ``Signum`` (which implements Bernstein et al. 2018); 0 gives
    signSGD."""

    weight_decay: float = 0.0
    """Decoupled weight decay ``wd`` in ``W <- (1 - lr wd) W``. Signum as published has no
    decoupled decay, hence 0; set it (e.g. AdamW's 0.1, SPEC §3) when Signum is SPECTRA's base,
    whose weight bound ``s c / wd`` needs ``wd > 0`` (``docs/spectra.md``)."""

    def __post_init__(self) -> None:
        if isinstance(self.momentum, bool) or not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"Signum momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.weight_decay, bool) or not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"Signum weight_decay must be a finite number >= 0, got {self.weight_decay!r}")


def signum_init_state(p: Tensor) -> dict[str, Any]:
    """Fresh state for parameter ``p``: step 0 and a zero momentum of ``p``'s shape and dtype."""
    return {"step": 0, "momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}


def signum_direction_(grad: Tensor, state: dict[str, Any], cfg: SignumConfig) -> Tensor:
    """Advance the state by one step and return the direction ``D = sign(m)`` (a new tensor).

    The step the optimiser takes is ``W <- (1 - lr wd) W - lr D``; ``D`` excludes ``lr`` and the
    weight decay so that a caller (SPECTRA) can transform it before applying it.
    """
    m = state["momentum_buffer"]
    m.mul_(cfg.momentum).add_(grad.to(m.dtype), alpha=1.0 - cfg.momentum)
    state["step"] += 1
    return torch.sign(m)


class Signum(DirectionOptimizer):
    """Signum (Bernstein et al., 2018) with decoupled weight decay, for parameters of any shape.

    Args:
        params: tensors or param groups (a group may override any keyword below).
        lr: learning rate (> 0), the magnitude of every nonzero entry of the step. There is no
            paper default that transfers across models; 1e-3 is Adam's default step size
            (Kingma & Ba, 2015), which Signum's unit-entry direction matches in RMS. Tune it.
        momentum, weight_decay: see :class:`SignumConfig`.
    """

    config_cls = SignumConfig
    init_state = staticmethod(signum_init_state)
    direction = staticmethod(signum_direction_)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, SignumConfig(momentum=momentum, weight_decay=weight_decay))
