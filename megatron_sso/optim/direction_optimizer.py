"""Shared plumbing of the elementwise optimizers (Signum, AdEMAMix): config mixin, lr check,
and a thin ``torch.optim`` class over a functional ``(init_state, direction_)`` pair.

Each such optimizer is a functional core that advances its state and returns the per-unit-lr
direction ``D`` without weight decay (what SPECTRA clips, :mod:`megatron_sso.optim.spectra`),
plus :class:`DirectionOptimizer`, which applies ``W <- (1 - lr wd) W - lr D`` in a plain
per-parameter loop (the reference, not a fused kernel).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch

Tensor = torch.Tensor


class ConfigFields:
    """Mixin of the frozen optimiser configs of this package: their field names, and
    construction from a mapping that may hold other keys (a param group)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Any:
        return cls(**{k: values[k] for k in cls.field_names() if k in values})


def run_closure(closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
    """Evaluate an optimizer ``step`` closure with gradients enabled (``step`` itself runs
    under ``torch.no_grad``), as every ``torch.optim`` optimizer does."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_learning_rate(lr: Any) -> None:
    """Raise ``ValueError`` naming ``lr`` unless it is a positive finite number."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive finite number, got lr={lr!r}")


class DirectionOptimizer(torch.optim.Optimizer):
    """``W <- (1 - lr wd) W - lr D`` with ``D = direction(grad, state, cfg)``.

    Subclasses set ``config_cls`` (a frozen :class:`ConfigFields` dataclass with a
    ``weight_decay`` field), ``init_state`` and ``direction`` (plain functions, as
    ``staticmethod``).
    """

    config_cls: ClassVar[type]
    init_state: ClassVar[Callable[[Tensor], dict[str, Any]]]
    direction: ClassVar[Callable[[Tensor, dict[str, Any], Any], Tensor]]

    def __init__(self, params: Any, lr: float, cfg: Any) -> None:
        check_learning_rate(lr)
        super().__init__(params, {"lr": lr, **dataclasses.asdict(cfg)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.config_cls.from_mapping(group)  # validates the group's overrides
        check_learning_rate(group["lr"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = run_closure(closure)
        for group in self.param_groups:
            cfg = self.config_cls.from_mapping(group)
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p))
                d = self.direction(p.grad, state, cfg)
                if cfg.weight_decay:
                    p.mul_(1.0 - lr * cfg.weight_decay)
                p.add_(d, alpha=-lr)
        return loss
