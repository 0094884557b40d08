"""Data-parallel collectives of the sharded sphere optimizer.

After each rank has updated the pieces the plan (:mod:`.dp_plan`) gave it, every rank needs
every updated weight. :func:`all_gather_pieces` packs a rank's pieces into one flat buffer,
all-gathers the buffers (padded to the longest, as ``all_gather`` needs equal sizes) and
unpacks every rank's buffer into the owners' views. Values travel in their own dtype's
float container and are copied, never recomputed, so every rank ends bit-identical to the
owner. Cost per rank: ``(P - 1) * max_rank_numel * itemsize`` bytes sent (ring all-gather);
the plan balances compute, not numel, so the padding is reported.

:func:`agree_flags` turns per-rank observations (a non-finite gradient) into one decision that
every rank shares, so that no rank steps a matrix that another skips (one small all-reduce).

:class:`SubgroupCache` creates the process groups over which the pieces of a split module
run their sharded Newton-Schulz.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .comm import CommCounter, Group, all_reduce_sum_, global_ranks, group_rank, group_size

Tensor = torch.Tensor


def agree_flags(flags: Tensor, group: Group, counter: Optional[CommCounter] = None, tag: str = "dp") -> Tensor:
    """Sum a float flag vector over ``group`` in place: an entry is non-zero afterwards if
    any rank set it. A group of one returns ``flags`` untouched."""
    if flags.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flags must be a float32/float64 vector (gloo and NCCL sum it), got {flags.dtype}")
    return all_reduce_sum_(flags, group, counter, tag)


def all_gather_pieces(views_by_rank: Sequence[Sequence[Tensor]], group: Group,
                      counter: Optional[CommCounter] = None, tag: str = "dp",
                      dtype: torch.dtype = torch.float32) -> int:
    """Make every rank's views equal to their owner's values.

    Args:
        views_by_rank: for each rank of ``group`` (group-rank order), the views it owns, in an
            order every rank agrees on. This rank's entries are read, every other rank's are
            written (in place).
        dtype: the container dtype of the flat buffers (wide enough for every view's dtype;
            float32 holds bf16 and fp16 exactly).

    Returns:
        The padded per-rank buffer length (elements).
    """
    size = group_size(group)
    if len(views_by_rank) != size:
        raise ValueError(f"views_by_rank has {len(views_by_rank)} entries for a group of {size}")
    if size == 1:
        return sum(v.numel() for v in views_by_rank[0])
    me = group_rank(group)
    lengths = [sum(v.numel() for v in views) for views in views_by_rank]
    longest = max(lengths)
    device = next((v.device for views in views_by_rank for v in views), torch.device("cpu"))
    if longest == 0:
        return 0
    send = torch.zeros(longest, dtype=dtype, device=device)
    pos = 0
    for v in views_by_rank[me]:
        send[pos:pos + v.numel()].view(v.shape).copy_(v)
        pos += v.numel()
    recv = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(recv, send, group=group)
    if counter is not None:
        counter.all_gather(tag, longest * send.element_size(), size)
    for r, views in enumerate(views_by_rank):
        if r == me:
            continue
        pos = 0
        for v in views:
            v.copy_(recv[r][pos:pos + v.numel()].view(v.shape))
            pos += v.numel()
    return longest


SubgroupFactory = Callable[[list[int]], dist.ProcessGroup]


def _default_factory(ranks: list[int]) -> dist.ProcessGroup:
    # Only the members call: the pieces of different modules involve different rank sets.
    return dist.new_group(ranks, use_local_synchronization=True)


class SubgroupCache:
    """Process groups over subsets of a parent group, created once per rank set.

    Members must request their groups in one global order (the optimizer asks in ascending
    module order), which makes creation deadlock-free: a rank waits only on peers that are
    at the same or an earlier module. ``factory(global_ranks)`` may be replaced (e.g. by a
    Megatron helper); the default is ``torch.distributed.new_group`` with local
    synchronisation, which non-members need not call.
    """

    def __init__(self, parent: Group, factory: Optional[SubgroupFactory] = None) -> None:
        self.parent = parent
        self.factory = factory or _default_factory
        self._members = global_ranks(parent)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def get(self, parent_ranks: Sequence[int]) -> Group:
        """The group of the parent's ranks ``parent_ranks`` (which must include this rank);
        ``None`` (no communication) for a single rank."""
        ranks = sorted(set(int(r) for r in parent_ranks))
        if len(ranks) != len(parent_ranks):
            raise ValueError(f"subgroup ranks must be distinct, got {list(parent_ranks)}")
        if any(not 0 <= r < len(self._members) for r in ranks):
            raise ValueError(f"subgroup ranks {ranks} outside the parent group of {len(self._members)}")
        if group_rank(self.parent) not in ranks:
            raise ValueError(f"this rank ({group_rank(self.parent)}) is not in the subgroup {ranks}")
        if len(ranks) == 1:
            return None
        key = tuple(self._members[r] for r in ranks)
        if key not in self._groups:
            self._groups[key] = self.factory(list(key))
        return self._groups[key]
