"""Process-group helpers and the byte accounting of every collective this package issues.

Convention: a ``group`` argument of ``None`` means *no group* (a trivial group of one process,
no communication, ``torch.distributed`` need not be initialised). To use every process pass
``torch.distributed.group.WORLD`` explicitly. This lets the same optimizer code run single
process, under tensor parallelism only, data parallelism only, or both.

Bytes are counted per rank and per step with the textbook ring algorithms (NCCL's default for
large messages; Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms", 2009):

* all-reduce of ``S`` bytes over ``P`` ranks: each rank sends ``2 (P - 1) / P * S``;
* all-gather of ``S`` bytes per rank (``P S`` in all): each rank sends ``(P - 1) S``.

``payload`` is the size of the tensors handed to the collectives, independent of the algorithm.
Nothing is counted for a group of one (no collective is issued).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    """Number of processes in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def global_ranks(group: Group) -> list[int]:
    """Global ranks of ``group``'s members in group-rank order (``[own rank]`` or ``[0]`` for ``None``)."""
    if group is None:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return list(dist.get_process_group_ranks(group))


def ring_allreduce_bytes(nbytes: int, size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` over ``size`` ranks."""
    return 2.0 * (size - 1) / size * nbytes if size > 1 else 0.0


def ring_allgather_bytes(nbytes_per_rank: int, size: int) -> float:
    """Bytes one rank sends in a ring all-gather of ``nbytes_per_rank`` from each of ``size`` ranks."""
    return float((size - 1) * nbytes_per_rank) if size > 1 else 0.0


@dataclass
class CommCounter:
    """Accumulates, per tag (``"tp"``, ``"dp"``, ``"dp_split"``, ...), the modelled bytes this
    rank sends (``wire``), the payload bytes, and the number of collectives."""

    wire: dict[str, float] = field(default_factory=dict)
    payload: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def _add(self, tag: str, wire: float, payload: int) -> None:
        self.wire[tag] = self.wire.get(tag, 0.0) + wire
        self.payload[tag] = self.payload.get(tag, 0) + payload
        self.calls[tag] = self.calls.get(tag, 0) + 1

    def all_reduce(self, tag: str, nbytes: int, size: int) -> None:
        if size > 1:
            self._add(tag, ring_allreduce_bytes(nbytes, size), nbytes)

    def all_gather(self, tag: str, nbytes_per_rank: int, size: int) -> None:
        if size > 1:
            self._add(tag, ring_allgather_bytes(nbytes_per_rank, size), nbytes_per_rank * size)

    def reset(self) -> None:
        self.wire.clear()
        self.payload.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, float]:
        """``comm_bytes`` (modelled bytes sent by this rank), ``comm_payload_bytes``,
        ``comm_calls`` and ``comm_bytes_<tag>`` per tag."""
        out: dict[str, float] = {
            "comm_bytes": float(sum(self.wire.values())),
            "comm_payload_bytes": float(sum(self.payload.values())),
            "comm_calls": float(sum(self.calls.values())),
        }
        for tag, value in sorted(self.wire.items()):
            out[f"comm_bytes_{tag}"] = float(value)
        return out


def all_reduce_sum_(x: torch.Tensor, group: Group, counter: Optional[CommCounter] = None,
                    tag: str = "dp") -> torch.Tensor:
    """Sum ``x`` over ``group`` in place (no-op for a group of one) and return it."""
    size = group_size(group)
    if size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        if counter is not None:
            counter.all_reduce(tag, x.numel() * x.element_size(), size)
    return x


def fingerprint(items: Iterable[object]) -> int:
    """A process-independent 31-bit checksum of the ``repr`` of ``items`` (CRC-32; Python's
    ``hash`` of strings is salted per process, so it cannot be compared across ranks)."""
    crc = 0
    for item in items:
        crc = zlib.crc32(repr(item).encode(), crc)
    return crc & 0x7FFFFFFF


def assert_same_across(group: Group, value: int, what: str,
                       device: Optional[torch.device] = None) -> None:
    """Raise ``ValueError`` unless every rank of ``group`` passes the same integer ``value``.

    One all-reduce of two int64 (MAX of ``value`` and of ``-value``); used once at
    construction to catch module lists that differ between ranks, which would otherwise
    deadlock or silently mix matrices. ``device``: where the backend wants tensors (CUDA for NCCL).
    """
    if group_size(group) == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != value or -int(t[1]) != value:
        raise ValueError(
            f"{what} differs between ranks of the process group (this rank's fingerprint "
            f"{value}, seen {-int(t[1])}..{int(t[0])}); every rank must describe the same modules"
        )
