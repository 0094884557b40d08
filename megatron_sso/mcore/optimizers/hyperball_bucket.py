"""Muon-Hyperball buckets of :class:`~.sphere_optimizer.MegatronSphere` (``optimizer: muon_hyperball``).

Same atomic modules, TP gather, DP sharding and checkpoint layout as the spectral modes; only the
update (:func:`megatron_sso.optim.hyperball.hyperball_update_`) and what the packed cache holds
differ. **Checkpoint layout:** each parameter keeps ``momentum_buffer`` and ``sphere_cache``
(fp32, the parameter's shape, so torch_dist stores them as ShardedTensors like every other
state); inside each atomic module's ``(m, n)`` view of ``sphere_cache``, row 0 holds the module's
Frobenius radius ``R`` broadcast along the row (so every TP column shard has it) and the other
rows are unused zeros. ``R = 0`` means "not set yet": the module's first step sets it to
``c ||W_0||_F`` of the full (TP-gathered) module. A DP owner sends that row with the weight and
momentum, so every rank holds the same radius; resume restores it bit for bit.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch

from ...optim.config import SphereConfig
from ...optim.hyperball import HyperballBuffers, hyperball_update_

Tensor = torch.Tensor

HYPERBALL_CACHE_ROWS = 1
"""Rows of a module's packed cache that hold data in ``hyperball`` mode (the radius)."""


def step_hyperball_bucket(opt: Any, entries: list, cfg: SphereConfig, lr: float, kinds: dict,
                          skip: Optional[Tensor]) -> Any:
    """One batched Muon-Hyperball step for ``entries`` (``(index, param, state, module, layout)``
    of one shape), written back into the modules' views; per-kind stats appended to ``kinds``
    (max ``| ||W||_F / R - 1 |`` of the step-start weights, summed update RMS, count)."""
    _, _, _, mod0, layout0 = entries[0]
    m, n = mod0.full_shape

    stacked = opt._stacked(entries)
    W, G, M = opt._gather_bucket(entries)
    radius = stacked(lambda p, s, mod: mod.view(s["sphere_cache"])[0, 0])
    bufs = HyperballBuffers(momentum=M, radius=radius.clone())
    before = W.clone()
    stats = hyperball_update_(W, G, bufs, cfg, lr, skip=skip)
    for i, (_, p, s, mod, layout) in enumerate(entries):
        mod.view(p).copy_(opt._keep_own(W[i], mod, layout))
        mod.view(s["momentum_buffer"]).copy_(opt._keep_own(bufs.momentum[i], mod, layout))
        row = mod.view(s["sphere_cache"])[0]
        row.copy_(bufs.radius[i].expand_as(row))
    rms = (W - before).flatten(1).norm(dim=1) / (m * n) ** 0.5
    err = (stats.sigma - 1.0).abs()
    by_kind = defaultdict(list)
    for i, (_, _, _, mod, _) in enumerate(entries):
        by_kind[mod.kind].append(i)
    for kind, idx in by_kind.items():
        sel = torch.tensor(idx, device=W.device)
        kinds[kind].append(torch.stack([err[sel].max(), rms[sel].sum(), torch.tensor(float(len(idx)), device=W.device)]))
    return stats
