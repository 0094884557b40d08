"""Balancing moves for the data-parallel plan: the zig-zag deal and two local searches.

* :func:`zigzag_deal`: sort by cost, deal ranks ``0..R-1``, ``R-1..0``, ... (SPEC §4);
* :class:`Assignment.refine`: move or swap pieces off the most loaded rank while that lowers
  its load without raising another's past it (each accepted move lowers the sum of squared
  loads, so it terminates);
* :func:`shift_boundaries`: move rows across the boundary of two pieces of one module.
"""

from __future__ import annotations

import bisect
from typing import Optional, Sequence

from .dp_cost import CostModel, Piece, PlanItem, unit_costs

SHIFT_SOURCES = 32
"""Most loaded ranks searched for a row shift per step of :func:`_shift_boundaries`."""
SWAP_TARGETS = 8
"""Least-loaded ranks searched for a swap partner per refinement step (bounds the search)."""


def zigzag_deal(costs: Sequence[float], world: int) -> list[int]:
    """Owner per cost: sorted descending (ties by index), dealt 0..R-1, R-1..0, 0..R-1, ..."""
    owner = [0] * len(costs)
    for pos, i in enumerate(sorted(range(len(costs)), key=lambda k: (-costs[k], k))):
        sweep, k = divmod(pos, world)
        owner[i] = k if sweep % 2 == 0 else world - 1 - k
    return owner


class Assignment:
    """Mutable per-rank bookkeeping for the refinement (sorted costs, items held)."""

    def __init__(self, pieces: Sequence[Piece], owner: list[int], world: int) -> None:
        self.pieces, self.owner = pieces, owner
        self.loads = [0.0] * world
        self.sorted: list[list[tuple[float, int]]] = [[] for _ in range(world)]
        self.items: list[dict[int, int]] = [{} for _ in range(world)]
        for i, r in enumerate(owner):
            self._add(i, r)

    def _add(self, i: int, r: int) -> None:
        p = self.pieces[i]
        self.loads[r] += p.cost
        bisect.insort(self.sorted[r], (p.cost, i))
        self.items[r][p.item] = self.items[r].get(p.item, 0) + 1
        self.owner[i] = r

    def _remove(self, i: int) -> None:
        p, r = self.pieces[i], self.owner[i]
        self.loads[r] -= p.cost
        self.sorted[r].remove((p.cost, i))
        self.items[r][p.item] -= 1
        if not self.items[r][p.item]:
            del self.items[r][p.item]

    def move(self, i: int, r: int) -> None:
        self._remove(i)
        self._add(i, r)

    def repair_conflicts(self) -> None:
        """Pieces of one item must sit on distinct ranks (they compute together)."""
        for r in range(len(self.loads)):
            for _, i in list(self.sorted[r]):
                item = self.pieces[i].item
                if self.items[r].get(item, 0) > 1:
                    free = [t for t in range(len(self.loads)) if item not in self.items[t]]
                    self.move(i, min(free, key=lambda t: (self.loads[t], t)))

    def refine(self, max_steps: int) -> None:
        world = len(self.loads)
        for _ in range(max_steps):
            r = max(range(world), key=lambda t: (self.loads[t], -t))
            top = self.loads[r]
            eps = 1e-12 * top
            asc = sorted(range(world), key=lambda t: (self.loads[t], t))
            if self._try_move(r, top, eps, asc) or self._try_swap(r, top, eps, asc):
                continue
            return

    def _try_move(self, r: int, top: float, eps: float, asc: list[int]) -> bool:
        for cost, i in reversed(self.sorted[r]):
            item = self.pieces[i].item
            for t in asc:
                if self.loads[t] + cost >= top - eps:
                    break
                if t != r and item not in self.items[t]:
                    self.move(i, t)
                    return True
        return False

    def _try_swap(self, r: int, top: float, eps: float, asc: list[int]) -> bool:
        best: Optional[tuple[float, int, int]] = None
        targets = [t for t in asc if t != r][:SWAP_TARGETS]
        for cost, i in reversed(self.sorted[r]):
            item = self.pieces[i].item
            for t in targets:
                gap = top - self.loads[t]
                if gap <= eps or item in self.items[t]:
                    continue
                # q from t with cost_q in (cost - gap, cost): both ranks end below ``top``;
                # the ideal cost_q leaves them equal.
                lst = self.sorted[t]
                ideal = cost - gap / 2.0
                k = bisect.bisect_left(lst, (ideal, -1))
                for j in (k - 1, k, k - 2, k + 1):
                    if not 0 <= j < len(lst):
                        continue
                    cq, q = lst[j]
                    if not (cost - gap + eps < cq < cost - eps):
                        continue
                    if self.pieces[q].item in self.items[r]:
                        continue
                    new_max = max(top - cost + cq, self.loads[t] - cq + cost)
                    if best is None or new_max < best[0]:
                        best = (new_max, i, q)
        if best is None or best[0] >= top - eps:
            return False
        _, i, q = best
        t = self.owner[q]
        self.move(i, t)
        self.move(q, r)
        return True


def shift_boundaries(items: Sequence[PlanItem], pieces: list[Piece], owner: list[int], world: int,
                      model: CostModel, max_steps: int) -> list[Piece]:
    """Move rows across the boundary between neighbouring pieces of one module, from the most
    loaded rank to a lighter neighbour's rank (the pieces of a module are contiguous, so load
    can flow along them continuously: what whole-piece moves cannot do)."""
    pieces = list(pieces)
    loads = [0.0] * world
    mine: list[list[int]] = [[] for _ in range(world)]
    for i, (p, r) in enumerate(zip(pieces, owner)):
        loads[r] += p.cost
        if p.parts > 1:
            mine[r].append(i)
    for _ in range(max_steps):
        best = None
        # The heaviest rank that can pass rows to a lighter neighbour (the very heaviest may
        # have none; relieving the next ones lets the load diffuse along the chains).
        for r in sorted(range(world), key=lambda t: (-loads[t], t))[:SHIFT_SOURCES]:
            for i in mine[r]:
                per = unit_costs(items[pieces[i].item], model)[0]
                for j in (i - 1, i + 1):
                    if 0 <= j < len(pieces) and pieces[j].item == pieces[i].item:
                        delta = min(int((loads[r] - loads[owner[j]]) / (2.0 * per)), pieces[i].length - 1)
                        if delta >= 1 and (best is None or delta * per > best[0]):
                            best = (delta * per, i, j, r, delta)
            if best is not None:
                break
        if best is None:
            return pieces
        _, i, j, r, delta = best
        per, fixed = unit_costs(items[pieces[i].item], model)
        a, b = pieces[i], pieces[j]
        if j == i + 1:
            a2 = Piece(a.item, a.part, a.parts, a.start, a.length - delta, per * (a.length - delta) + fixed)
            b2 = Piece(b.item, b.part, b.parts, b.start - delta, b.length + delta, per * (b.length + delta) + fixed)
        else:
            a2 = Piece(a.item, a.part, a.parts, a.start + delta, a.length - delta, per * (a.length - delta) + fixed)
            b2 = Piece(b.item, b.part, b.parts, b.start, b.length + delta, per * (b.length + delta) + fixed)
        loads[r] += a2.cost - a.cost
        loads[owner[j]] += b2.cost - b.cost
        pieces[i], pieces[j] = a2, b2
    return pieces
