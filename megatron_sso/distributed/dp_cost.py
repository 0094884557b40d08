"""Cost model of the data-parallel plan: what one rank pays per step to update a module.

See :mod:`megatron_sso.distributed.dp_plan` for the models (``"numel"``: elements x expected
msign calls, SPEC §4; ``"flops"``: Newton-Schulz flops with the Gram on the unsplit side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CostModel = Literal["numel", "flops"]


@dataclass(frozen=True)
class PlanItem:
    """One module as the planner sees it: an ``length x gram`` matrix (``length`` along the
    dimension that may be split), ``calls`` expected msign calls per step."""

    length: int
    gram: int
    calls: float = 1.0
    splittable: bool = True
    steps: int = 8

    def __post_init__(self) -> None:
        for name in ("length", "gram", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PlanItem.{name} must be a positive integer, got {value!r}")
        if not (self.calls > 0 and math.isfinite(self.calls)):
            raise ValueError(f"PlanItem.calls must be positive, got {self.calls!r}")


def check_cost_model(model: str) -> str:
    if model not in ("numel", "flops"):
        raise ValueError(f"unknown cost model {model!r}; choose 'numel' or 'flops'")
    return model


def unit_costs(item: PlanItem, model: CostModel = "numel") -> tuple[float, float]:
    """``(per_length, fixed)``: a piece of length ``l`` costs ``per_length * l + fixed``
    (``fixed`` is the replicated ``A^2`` product under ``"flops"``, 0 under ``"numel"``)."""
    if model == "numel":
        return item.calls * item.gram, 0.0
    if model == "flops":
        g = float(item.gram)
        return item.calls * item.steps * 4.0 * g * g, item.calls * item.steps * 2.0 * g ** 3
    raise ValueError(f"unknown cost model {model!r}; choose 'numel' or 'flops'")


def piece_cost(item: PlanItem, parts: int = 1, model: CostModel = "numel") -> float:
    """Cost of the largest of ``parts`` near-even pieces of ``item`` (see module docstring)."""
    per, fixed = unit_costs(item, model)
    return per * -(-item.length // parts) + fixed


@dataclass(frozen=True)
class Piece:
    """Part ``part`` of ``parts`` of item ``item``: ``[start, start + length)`` of its split dim."""

    item: int
    part: int
    parts: int
    start: int
    length: int
    cost: float
