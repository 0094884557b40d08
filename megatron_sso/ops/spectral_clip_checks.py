"""Argument checks shared by the spectral clips (imports torch only).

Every clip validates its input the same way and raises ``ValueError`` naming the function and
the bad value (never a bare assert), so a wrong call fails at the call site with a message a
user can act on.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Optional, Union

import torch

Tensor = torch.Tensor
AllReduce = Callable[[Tensor], Optional[Tensor]]
"""Sums a tensor over the shards of a tensor-parallel group, in place (returning ``None``
or the same tensor) or out of place (returning the sum)."""

_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


def check_matrix(X: Tensor, who: str) -> None:
    """``X`` must be a floating tensor of at least two dimensions (a matrix or a batch)."""
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{who}: X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() < 2:
        raise ValueError(
            f"{who}: X must be a matrix or a batch of matrices (..., m, n), got shape {tuple(X.shape)}"
        )
    if not X.is_floating_point():
        raise ValueError(f"{who}: X must have a floating dtype, got {X.dtype}")


def check_threshold(c: Union[float, Tensor], who: str) -> float:
    """The clip level ``c`` as a positive finite float (a real number or a one-element tensor)."""
    if isinstance(c, torch.Tensor) and c.numel() == 1 and (c.is_floating_point() or c.dtype in _INT_DTYPES):
        value = float(c.item())
    elif isinstance(c, numbers.Real) and not isinstance(c, bool):
        value = float(c)
    else:
        raise ValueError(f"{who}: c must be a positive finite number, got {c!r}")
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{who}: c must be a positive finite number, got {c!r}")
    return value


def check_steps(steps: int) -> int:
    """A positive integer number of Newton-Schulz steps (``bool`` refused)."""
    if isinstance(steps, bool):
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}")
    try:
        value = operator.index(steps)
    except TypeError:
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}") from None
    if value < 1:
        raise ValueError(f"soft_spectral_clip: steps must be a positive integer, got {steps!r}")
    return value

