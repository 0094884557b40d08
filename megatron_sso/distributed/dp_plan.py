"""Which data-parallel rank updates which atomic module: a cost-balanced plan.

ZeRO-1 flat-buffer sharding cuts matrices, but msign needs whole ones, so SSO shards *whole
atomic modules* across the data-parallel ranks (SPEC §4): each rank updates its share, then
the updated weights are all-gathered. The plan is a pure function of the cost list, so every
rank computes the same plan without communicating.

Cost of a module (per step, on one rank), selectable:

* ``"numel"`` (SPEC §4): elements x expected msign calls;
* ``"flops"``: Newton-Schulz flops, ``steps x calls x (4 g^2 l + 2 g^3)`` for an ``l x g``
  piece whose Gram is ``g x g`` (``Y Y^T`` and ``(bA + cA^2) Y`` cost ``2 g^2 l`` each,
  ``A^2`` ``2 g^3``). A Q head (128 x 2048) then costs 16x less per element than a gate
  (6144 x 2048): the shorter side sets the Gram. The block power iteration (``4 m n b`` flops
  per iteration, b = 8) is < 2% of one msign for ``g >= 128`` and is left out.

Expected msign calls: ``lambda_evals`` (2) for a warm SSO step, 1 for MuonSphere and Muon.
Same-shape modules of a rank run as one batched update (one launch for all Q heads of a rank),
which the cost model does not reward: on a GPU small matrices cost more than their flops.

The deal (SPEC §4): sort by cost, descending, and deal ranks ``0..R-1``, then ``R-1..0``, and so
on ("zig-zag" or "ping-pong"); then a local search moves or swaps modules off the most loaded
rank while that lowers its load without raising another's past it (LPT-style refinement; each
accepted move lowers the sum of squared loads, so it terminates).

Whole modules cannot balance when one module costs more than the mean load (Dense 1.7B at
DP = 512: a 6144 x 2048 gate is 4.6x the mean, and at DP = 64 two gates on one rank are 1.14x).
With ``split="auto"`` the modules above a threshold are then cut along their longer (or
tensor-parallel) dimension into pieces that *fill* the ranks left below the mean after the
others were dealt ("water filling"); the pieces of one module run the sharded Newton-Schulz of
:mod:`megatron_sso.ops` together over a subgroup, exactly as tensor parallelism does. The
highest threshold (least splitting) that meets ``tolerance`` wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from .dp_balance import Assignment, shift_boundaries, zigzag_deal
from .dp_cost import CostModel, Piece, PlanItem, check_cost_model, piece_cost, unit_costs

__all__ = ["CostModel", "DEFAULT_TOLERANCE", "DPPlan", "Piece", "PlanItem", "SplitPolicy", "check_cost_model",
           "piece_cost", "plan_dp", "unit_costs", "zigzag_deal"]

SplitPolicy = Literal["never", "auto"]

DEFAULT_TOLERANCE = 1.05
"""Target imbalance (max rank cost / mean rank cost) of the issue "Distributed SSO"."""
SPLIT_FACTORS = (1.0, 0.5, 0.25)
"""Splitting thresholds tried, as fractions of the mean load: the modules costing more than
the threshold are the ones cut. Larger factors split fewer modules (fewer subgroups and Gram
all-reduces), so they are tried first."""
MIN_PIECE_FRACTION = 0.125
"""A piece is at least ``gram / 8`` long (and the last piece of a module is never shorter):
every piece pays the same Gram all-reduce per Newton-Schulz iteration whatever its length, so
slivers would cost communication for almost no compute ..."""
MIN_PIECE_LEVEL = 0.25
"""... unless that is more than a quarter of the mean load (wide Grams at large DP: a
``2048``-wide piece of ``256`` rows is 1.1x the mean at Dense/MoE DP = 512 with TP = 2), then
a quarter of the mean load is the floor, so that pieces can still fill the ranks."""


@dataclass(frozen=True)
class DPPlan:
    """The assignment of pieces to ranks, with its loads."""

    world: int
    pieces: tuple[Piece, ...]
    owner: tuple[int, ...]
    loads: tuple[float, ...]
    whole_total: float
    """Total cost without any splitting (to measure the overhead splitting adds)."""

    @property
    def imbalance(self) -> float:
        """Max rank cost / mean rank cost (1.0 is perfect; 1.0 for an empty plan)."""
        total = sum(self.loads)
        return max(self.loads) * self.world / total if total > 0 else 1.0

    @property
    def max_load(self) -> float:
        return max(self.loads)

    @property
    def makespan_ratio(self) -> float:
        """Max rank cost / the mean a whole-module plan would have: the imbalance including
        what splitting added (equal to :attr:`imbalance` under ``"numel"``)."""
        return max(self.loads) * self.world / self.whole_total if self.whole_total > 0 else 1.0

    @property
    def split_items(self) -> int:
        return len({p.item for p in self.pieces if p.parts > 1})

    @property
    def split_overhead(self) -> float:
        """Relative cost added by splitting (the replicated ``g^3`` term under ``"flops"``)."""
        return sum(self.loads) / self.whole_total - 1.0 if self.whole_total > 0 else 0.0

    def pieces_of(self, rank: int) -> list[int]:
        """Indices into :attr:`pieces` owned by ``rank``, ordered by (item, part)."""
        return [i for i, r in enumerate(self.owner) if r == rank]

    def ranks_of(self, item: int) -> list[int]:
        """Owners of ``item``'s pieces, in part order."""
        return [self.owner[i] for i, p in enumerate(self.pieces) if p.item == item]

    def summary(self) -> dict[str, float]:
        return {"world": self.world, "pieces": len(self.pieces), "split_items": self.split_items,
                "imbalance": self.imbalance, "makespan_ratio": self.makespan_ratio,
                "split_overhead": self.split_overhead,
                "max_load": max(self.loads), "mean_load": sum(self.loads) / self.world}


def _whole_plan(items: Sequence[PlanItem], world: int, model: CostModel, whole_total: float,
                refine: bool = True) -> DPPlan:
    pieces = [Piece(k, 0, 1, 0, it.length, piece_cost(it, 1, model)) for k, it in enumerate(items)]
    a = Assignment(pieces, zigzag_deal([p.cost for p in pieces], world), world)
    if refine:
        a.refine(max_steps=20 * len(pieces) + 100)
    return DPPlan(world, tuple(pieces), tuple(a.owner), tuple(a.loads), whole_total)


def _fill(items: Sequence[PlanItem], big: list[int], loads: list[float], level: float,
          model: CostModel) -> tuple[list[Piece], list[int]]:
    """Cut the ``big`` items into pieces that raise the least-loaded ranks to ``level``; when
    rounding leaves no rank below the level, raise it by the mass still to place and go on."""
    loads = list(loads)
    world = len(loads)
    pieces: list[Piece] = []
    owners: list[int] = []
    remaining = sum(piece_cost(items[k], 1, model) for k in big)
    order, ri = sorted(range(world), key=lambda t: (loads[t], t)), 0
    for k in big:
        it = items[k]
        per, fixed = unit_costs(it, model)
        min_len = max(1, min(it.length, math.ceil(MIN_PIECE_FRACTION * it.gram),
                             math.ceil(MIN_PIECE_LEVEL * level / per)))
        pos, used, part = 0, set(), 0
        while pos < it.length:
            left = it.length - pos
            need = per * min(min_len, left)
            while ri < world and (order[ri] in used or level - loads[order[ri]] - fixed < need):
                ri += 1
            if ri == world:
                if len(used) == world:  # every rank holds a piece: the rest joins the last one
                    r = owners[-1]
                    pieces[-1] = Piece(k, part - 1, 0, pieces[-1].start, pieces[-1].length + left,
                                       pieces[-1].cost + per * left)
                    loads[r] += per * left
                    break
                level += max(remaining / world, per * min_len + fixed)
                order, ri = sorted(range(world), key=lambda t: (loads[t], t)), 0
                continue
            r = order[ri]
            room = max(min(min_len, left), round((level - loads[r] - fixed) / per))
            if left <= room:
                length = left
            elif left - room < min_len <= left - min_len:
                length = left - min_len  # leave min_len, not a sliver, for the next rank
            else:
                length = room  # (a remainder shorter than min_len only when left < 2 min_len)
            cost = per * length + fixed
            pieces.append(Piece(k, part, 0, pos, length, cost))
            owners.append(r)
            loads[r] += cost
            remaining -= per * length
            used.add(r)
            pos += length
            part += 1
    return pieces, owners


def _split_plan(items: Sequence[PlanItem], world: int, model: CostModel, factor: float,
                whole_total: float) -> Optional[DPPlan]:
    threshold = factor * whole_total / world
    costs = [piece_cost(it, 1, model) for it in items]
    big = sorted((k for k, it in enumerate(items) if it.splittable and it.length > 1 and costs[k] > threshold),
                 key=lambda k: (-costs[k], k))
    if not big:
        return None
    bigset = set(big)
    small = [Piece(k, 0, 1, 0, it.length, costs[k]) for k, it in enumerate(items) if k not in bigset]
    a = Assignment(small, zigzag_deal([p.cost for p in small], world), world)
    a.refine(max_steps=20 * len(small) + 100)
    level = whole_total / world
    for _ in range(3):  # under "flops" every piece adds its fixed cost: re-level
        pieces, owners = _fill(items, big, a.loads, level, model)
        level = (sum(a.loads) + sum(p.cost for p in pieces)) / world
    counts: dict[int, int] = {}
    for p in pieces:
        counts[p.item] = counts.get(p.item, 0) + 1
    merged = small + [Piece(p.item, p.part, counts[p.item], p.start, p.length, p.cost) for p in pieces]
    owner = list(a.owner) + owners
    order = sorted(range(len(merged)), key=lambda i: (merged[i].item, merged[i].part))
    merged = [merged[i] for i in order]
    owner = [owner[i] for i in order]
    for _ in range(3):  # alternate the two local searches: rows between pieces, whole pieces
        merged = shift_boundaries(items, merged, owner, world, model, max_steps=4 * len(merged))
        final = Assignment(merged, owner, world)
        final.refine(max_steps=20 * len(merged) + 100)
        owner = final.owner
    return DPPlan(world, tuple(merged), tuple(final.owner), tuple(final.loads), whole_total)


def plan_dp(items: Sequence[PlanItem], world: int, *, model: CostModel = "numel",
            split: SplitPolicy = "never", tolerance: float = DEFAULT_TOLERANCE,
            refine: bool = True) -> DPPlan:
    """Assign ``items`` to ``world`` data-parallel ranks (see the module docstring).

    Args:
        items: the modules, in an order every rank agrees on.
        world: data-parallel group size (>= 1).
        model: ``"numel"`` or ``"flops"``.
        split: ``"never"`` (whole modules only, SPEC §4) or ``"auto"`` (when the whole-module
            plan's imbalance exceeds ``tolerance``, water-fill with pieces of the modules above
            ``factor x mean`` for each of :data:`SPLIT_FACTORS`; the first plan whose
            :attr:`DPPlan.makespan_ratio` meets ``tolerance`` wins, else the lowest max load).
        tolerance: target imbalance for ``split="auto"``.
        refine: run the local search after the zig-zag deal (``False``: the bare deal, for
            comparison; only with ``split="never"``).
    """
    check_cost_model(model)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"data-parallel world size must be a positive integer, got {world!r}")
    if split not in ("never", "auto"):
        raise ValueError(f"unknown split policy {split!r}; choose 'never' or 'auto'")
    if not tolerance >= 1.0:
        raise ValueError(f"imbalance tolerance must be >= 1, got {tolerance!r}")
    whole_total = sum(piece_cost(it, 1, model) for it in items)
    if not refine and split != "never":
        raise ValueError(f"refine=False is for the bare zig-zag deal; it needs split='never', got {split!r}")
    best = _whole_plan(items, world, model, whole_total, refine)
    if split == "never" or world == 1 or not items or best.imbalance <= tolerance:
        return best
    for factor in SPLIT_FACTORS:
        plan = _split_plan(items, world, model, factor, whole_total)
        if plan is not None and plan.max_load < best.max_load * (1.0 - 1e-12):
            best = plan
        if best.makespan_ratio <= tolerance:
            break
    return best
