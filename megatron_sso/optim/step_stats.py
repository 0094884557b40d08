"""Per-step statistics of the sphere optimizers, kept on the device until read.

Reading ``max_abs_h`` on the host after every solver evaluation is exactly the
synchronisation the paper's solver pays for (SPEC §7); here the step only records device
tensors, and the host reads them once, when (and if) someone asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .sphere_update import BatchStats

Tensor = torch.Tensor


@dataclass
class StepStats:
    """Totals over every batch of one optimizer step."""

    num_matrices: int
    msign_calls: int
    max_abs_h: Optional[Tensor]
    max_abs_lambda: Optional[Tensor]
    skipped: Optional[Tensor]
    fallbacks: Optional[Tensor] = None
    above_tol: Optional[Tensor] = None
    _cache: Optional[dict[str, float]] = None

    @classmethod
    def from_batches(cls, batches: list[BatchStats]) -> "StepStats":
        if not batches:
            return cls(0, 0, None, None, None)
        return cls(
            num_matrices=sum(b.num_matrices for b in batches),
            msign_calls=sum(b.msign_calls for b in batches),
            max_abs_h=torch.stack([b.max_abs_h.to(batches[0].max_abs_h.device) for b in batches]).max(),
            max_abs_lambda=torch.stack([b.max_abs_lambda.to(batches[0].max_abs_h.device) for b in batches]).max(),
            skipped=torch.stack([b.skipped.to(batches[0].max_abs_h.device) for b in batches]).sum(),
            fallbacks=torch.stack([b.fallbacks.to(batches[0].max_abs_h.device).float() for b in batches]).sum(),
            above_tol=torch.stack([b.above_tol.to(batches[0].max_abs_h.device).float() for b in batches
                                   if b.above_tol is not None] or [torch.zeros((), device=batches[0].max_abs_h.device)]).sum(),
        )

    def as_dict(self) -> dict[str, float]:
        if self._cache is None:
            values = [0.0, 0.0, 0.0, 0.0, 0.0]
            if self.max_abs_h is not None:
                values = torch.stack([self.max_abs_h.float(), self.max_abs_lambda.float(),
                                      self.skipped.float(), self.fallbacks.float(),
                                      self.above_tol.float()]).tolist()
            self._cache = {
                "num_matrices": self.num_matrices,
                "msign_calls": self.msign_calls,
                "msign_calls_per_matrix": self.msign_calls / max(self.num_matrices, 1),
                "max_abs_h": values[0],
                "max_abs_lambda": values[1],
                "skipped_nonfinite": int(values[2]),
                "lambda_fallbacks": int(values[3]),
                "lambda_above_tol": int(values[4]),
            }
        return dict(self._cache)
