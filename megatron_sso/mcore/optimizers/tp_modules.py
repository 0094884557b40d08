"""Whole atomic modules from tensor-parallel shards, for the optimizers Megatron's wrappers hold.

A module whose ``tp_dim`` is set (row-parallel proj and fc2, the gate/up halves of a TP-split
fc1) is split across the TP group; an optimizer that needs the whole matrix (SSO's duplicated
mode, SPECTRA's hard clip) all-gathers it, updates it identically on every rank and keeps this
rank's slice. Per-head QKV modules are whole on their rank and pass through untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .layouts import AtomicModule, ParamLayout

Tensor = torch.Tensor


class ModuleGatherMixin:
    """``_gather`` / ``_keep_own`` over the TP group of a module's layout (dense or expert).

    The host class sets ``tp_groups`` (``{"dense": group, "expert": group}``) and
    ``gather_bytes`` (bytes this rank received, counted here)."""

    tp_groups: dict[str, Any]
    gather_bytes: int

    def _group_of(self, layout: ParamLayout):
        return self.tp_groups.get("expert" if layout.expert else "dense")

    def _gather(self, local: Tensor, mod: AtomicModule, layout: ParamLayout, dim_offset: int = 1) -> Tensor:
        """All-gather along the module's TP dim (``dim_offset`` leading batch dims: a stacked
        ``(B, m_l, n_l)`` batch by default)."""
        if mod.tp_dim is None:
            return local
        group = self._group_of(layout)
        size = dist.get_world_size(group)
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        self.gather_bytes += local.numel() * local.element_size() * (size - 1)
        return torch.cat(pieces, dim=mod.tp_dim + dim_offset)

    def _keep_own(self, full: Tensor, mod: AtomicModule, layout: ParamLayout, dim_offset: int = 0) -> Tensor:
        """This rank's slice of a full module (``dim_offset`` leading batch dims; one ``(m, n)``
        matrix by default)."""
        if mod.tp_dim is None:
            return full
        rank = dist.get_rank(self._group_of(layout))
        local = mod.local_shape[mod.tp_dim]
        return full.narrow(mod.tp_dim + dim_offset, rank * local, local)
