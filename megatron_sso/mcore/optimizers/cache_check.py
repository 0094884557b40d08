"""Is a loaded packed ``sphere_cache`` still usable? Cold-restart the modules whose cache is not.

The packed cache (:mod:`.sphere_optimizer`: rows ``[0, b)`` the cached right singular block
transposed, row ``b`` lambda, row ``b + 1`` the secant slope, each broadcast along its row)
is only meaningful for the layout that wrote it. Two resumes silently break it:

* **another TP size** for a row-split module (the gate/up halves of ``linear_fc1``, expert
  fc1 under expert TP). Each TP rank keeps the whole block in its *own* rows, so after a
  resharded load rank 0 holds the old rank 0's rows and the other ranks hold rows that were
  never a cache (zeros at TP 1 -> 2). A zero block gives sigma = 0, and a weight with
  sigma = 0 is never retracted (measured: ``||gate||_2 / R = 1.013`` after 15 steps and rising,
  TP ranks diverging);
* **another ``sso_power_block``** (or a module whose local rows changed, which caps ``b``):
  the block, lambda and slope are then read from the wrong rows.

So on the first step after construction or ``load_state_dict`` every warm module's cache is
checked: finite, block orthonormal (``|V^T V - I| <= CACHE_ORTHO_TOL``), the lambda and slope
rows exactly constant (they are written by broadcasting one value), slope positive. A block of
``b_old > b`` rows leaves a singular-vector row where lambda belongs (not constant); one of
``b_old < b`` rows puts the constant lambda row inside the block (not orthonormal). The flags
are OR-ed over the module's TP group and DP group, so every rank that updates a module
together restarts it together. A restarted module keeps its momentum and takes the cold path
(50 block power iterations, the cold lambda solve): the same as its first step. Cost: one
host read per optimizer per load, nothing on later steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...distributed.comm import group_size

Tensor = torch.Tensor

CACHE_ORTHO_TOL = 1e-3
"""Largest ``|V^T V - I|`` entry of a usable cached block. The optimizer writes blocks that are
orthonormal to fp32 round-off (Cholesky-QR twice, then a Ritz rotation: ~1e-6); a block read
from the wrong rows or from zeros is off by O(1)."""


def cache_is_usable(rows: Tensor, b: int) -> Tensor:
    """0-d bool: whether ``rows`` (``(b + 2, n)``, a module's full packed cache rows) hold an
    orthonormal ``b``-row block, a constant lambda row and a constant positive slope row."""
    vt, lam, slope = rows[:b], rows[b], rows[b + 1]
    eye = torch.eye(b, dtype=rows.dtype, device=rows.device)
    ortho = ((vt @ vt.mT) - eye).abs().amax() <= CACHE_ORTHO_TOL
    constant = (lam == lam[0]).all() & (slope == slope[0]).all()
    return torch.isfinite(rows).all() & ortho & constant & (slope[0] > 0)


def cold_restarts(opt: Any, domain: Any, warm: dict, block_of, layout_attr: str) -> set[int]:
    """Indices (into ``domain.mods``) of warm modules whose cache is unusable, agreed over the
    domain's TP and DP groups. ``block_of(mod)`` is the module's cached block size and
    ``layout_attr`` the parameter attribute holding its layout. Every rank of those groups must
    call this (column-split blocks are gathered)."""
    if not any(warm[opt._param(ref)] for ref in domain.refs):  # a first step: no cache, no host read
        return set()
    flags = []
    for ref, mod in zip(domain.refs, domain.mods):
        p = opt._param(ref)
        if not warm[p]:
            flags.append(torch.zeros((), dtype=torch.bool, device=p.device))
            continue
        b = block_of(mod)
        rows = mod.view(opt.state[p]["sphere_cache"])[:b + 2]
        if mod.tp_dim == 1:  # the block's columns are split like the weight's
            rows = opt._gather(rows.unsqueeze(0), mod, getattr(p, layout_attr))[0]
        flags.append(~cache_is_usable(rows, b))
    if not flags:
        return set()
    bad = torch.stack(flags).float()
    for group in (domain.tp, domain.dp):
        if group_size(group) > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return {i for i, flag in enumerate(bad.tolist()) if flag > 0}
