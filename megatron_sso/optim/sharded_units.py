"""Work units of the distributed sphere optimizer and how a batch of them is stepped.

A *unit* is what one rank updates for one atomic module: the whole module, its
tensor-parallel shard, or a data-parallel piece of it. Its ``kind`` says how the math reaches
the rest of the matrix:

* ``"local"``: the whole matrix is here (a head under TP, any module at TP = 1): no hooks;
* ``"tp"``: a TP shard, sharded math with the TP group's ``allreduce`` (``tp_mode="sharded"``);
* ``"dup"``: a TP shard, all-gathered and updated whole on every TP rank, own slice kept
  (``tp_mode="duplicated"``);
* ``"split"``: a piece of a module the data-parallel plan cut for several ranks; sharded math
  over the TP group (if the module is TP-split too) and the pieces' subgroup.

Units of one kind and shape are stepped as one batch (one launch for all Q heads of a rank).
A batch of ``"tp"`` or ``"dup"`` units must be the same on every TP rank, which holds because
the plan, the module order and the keys are the same there (checked at construction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..distributed.atomic import AtomicModule
from ..distributed.comm import CommCounter, Group
from ..distributed.tensor_parallel import all_gather_shards
from ..ops.newton_schulz import AllReduce
from ..ops.retraction import target_radius, update_scale
from .config import SphereConfig
from .sphere_update import BatchStats, ShardHooks, SphereBuffers, init_sphere_state, sphere_update_

Tensor = torch.Tensor


@dataclass(eq=False)
class Unit:
    """One rank's share of one atomic module (see the module docstring)."""

    key: int
    """Global execution order; the same on every rank that shares the unit's collectives."""
    item: int
    """Index of the module in its domain's module list."""
    module: AtomicModule
    kind: str
    dim: Optional[int] = None
    """Dimension the piece is cut from the local view along (``"split"`` only)."""
    start: int = 0
    length: int = 0
    pdim: Optional[int] = None
    """Split dimension of the full matrix as the math sees it (``None``: whole here)."""
    offset: int = 0
    """First row/column of this unit's part in the full matrix (along ``pdim``)."""
    allreduce: Optional[AllReduce] = None
    gather_group: Group = None
    state: dict[str, Any] = field(default_factory=dict)

    def _cut(self, x: Tensor) -> Tensor:
        return x if self.dim is None else x.narrow(self.dim, self.start, self.length)

    def weight(self) -> Tensor:
        """The unit's part of the parameter, a view (SPEC pitfall 1)."""
        return self._cut(self.module.weight())

    def grad(self, attr: str) -> Optional[Tensor]:
        g = self.module.grad(attr)
        return None if g is None else self._cut(g)

    def state_key(self) -> str:
        """Names this unit's state in a checkpoint: domain position, piece and kind (the same
        for the same modules, groups and plan, whatever the process)."""
        return f"{self.key}:{self.start}+{self.length}:{self.kind}"

    def batch_key(self) -> tuple:
        w = self.weight()
        warm = ("right_block" in self.state, bool(self.state.get("lambda_warm", False)))
        if self.kind == "split":  # every split module has its own subgroup: never batched
            return ("split", self.key)
        return (self.kind, tuple(w.shape), w.dtype, self.module.full_shape, self.pdim, self.offset, warm)


def _init_state(unit: Unit, shape: tuple[int, int], device: torch.device) -> dict[str, Any]:
    return init_sphere_state(unit.state, shape, device, unit.module.full_shape)


def step_batch(units: list[Unit], cfg: SphereConfig, lr: float, skip: Tensor, grad_attr: str,
               counter: Optional[CommCounter]) -> BatchStats:
    """One sphere step for ``units`` (same :meth:`Unit.batch_key`); ``skip`` is ``(B,)`` bool."""
    u0 = units[0]
    if u0.kind == "split" and getattr(cfg, "msign_method", "standard") != "standard":
        # The Gram method is chosen per shard shape (ops.gram_side_is_small); the pieces of a
        # split module may differ in length across the ranks that reduce together, which
        # would give them different collective sequences. Pieces use the standard method.
        cfg = dataclasses.replace(cfg, msign_method="standard")
    views = [u.weight() for u in units]
    grads = [u.grad(grad_attr) for u in units]
    G = torch.stack([(g if g is not None else torch.zeros_like(v)).float() for g, v in zip(grads, views)])
    full = u0.module.full_shape
    hooks = None
    in_place = u0.kind != "dup" and len(units) == 1 and views[0].dtype == torch.float32
    W = views[0].unsqueeze(0) if in_place else torch.stack([v.float() for v in views])
    if u0.kind == "dup":
        d = u0.pdim + 1  # the batch dimension comes first
        W = all_gather_shards(W, u0.gather_group, d, counter, "tp")
        G = all_gather_shards(G, u0.gather_group, d, counter, "tp")
    elif u0.allreduce is not None:
        hooks = ShardHooks(u0.allreduce, u0.pdim, u0.offset)
    states = [_init_state(u, tuple(W.shape[1:]), W.device) for u in units]
    bufs = SphereBuffers.from_states(states)
    stats = sphere_update_(
        W, G, bufs, cfg, lr,
        target_radius(full[0], full[1], cfg.radius_mode, cfg.radius_scaler),
        update_scale(full[0], full[1], cfg.scale_mode),
        full_shape=full, hooks=hooks, skip=skip.to(W.device),
    )
    if u0.kind == "dup":
        d = u0.pdim + 1
        W = W.narrow(d, u0.module.tp_offset, views[0].size(u0.pdim))
    if not in_place:
        for i, v in enumerate(views):
            v.copy_(W[i])
    bufs.store_(states)
    return stats
