"""Tensor parallelism for one matrix split across a process group.

Megatron splits a column-parallel weight on ``d_out`` (rows, ``partition_dim = 0``) and a
row-parallel weight on ``d_in`` (columns, ``partition_dim = 1``), evenly, shard ``t`` on the
group's rank ``t`` (SPEC §4). Two ways to run the SSO update on such a matrix:

* ``"sharded"``: every op of :mod:`megatron_sso.ops` takes an ``allreduce`` hook and the
  ``partition_dim``; this module builds the hook from a ``torch.distributed`` group. Per step
  the reductions are: one Gram of the unsplit side per Newton-Schulz iteration, vectors and
  ``b x b`` Grams in the block power iteration, scalars for ``||M||_F``, ``h(lambda)`` and the
  non-finite check. Nothing of the size of the matrix is ever communicated.
* ``"duplicated"``: all-gather the shards of ``W`` and ``G`` (:func:`all_gather_shards`), run
  the single-process update on the full matrix on every rank (identical inputs give identical
  bits), keep the own slice. Simple, TP-times the compute, and often fewer bytes: see
  ``docs/distributed.md`` for the formulas.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist

from ..ops.newton_schulz import AllReduce
from .comm import CommCounter, Group, group_rank, group_size

Tensor = torch.Tensor
TPMode = Literal["sharded", "duplicated"]
TP_MODES = ("sharded", "duplicated")


def check_tp_mode(mode: str) -> str:
    """Return ``mode`` if it is a known tensor-parallel mode, else raise ``ValueError``."""
    if mode not in TP_MODES:
        raise ValueError(f"unknown tensor-parallel mode {mode!r}; choose 'sharded' or 'duplicated'")
    return mode


def check_partition_dim(partition_dim: Optional[int], allow_none: bool = True) -> Optional[int]:
    """Validate a partition dimension: 0 (rows split), 1 (columns split) or, if allowed, ``None``."""
    if partition_dim is None and allow_none:
        return None
    if isinstance(partition_dim, bool) or partition_dim not in (0, 1):
        raise ValueError(f"partition_dim must be 0 (rows split) or 1 (columns split), got {partition_dim!r}")
    return partition_dim


def make_allreduce(group: Group, counter: Optional[CommCounter] = None, tag: str = "tp") -> AllReduce:
    """The ``allreduce`` hook of :mod:`megatron_sso.ops` for ``group``: sums a tensor over the
    group and returns the sum.

    The ops only ever reduce freshly computed temporaries, so the sum is taken in place when
    the tensor owns contiguous memory; a view or a non-contiguous tensor is copied first (an
    in-place reduction would write into memory the caller may still read). For a group of
    one the tensor is returned as is. Each call is counted in ``counter`` under ``tag``.
    """
    size = group_size(group)

    def allreduce(x: Tensor) -> Tensor:
        if size == 1:
            return x
        buf = x if (x.is_contiguous() and x._base is None) else x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if counter is not None:
            counter.all_reduce(tag, buf.numel() * buf.element_size(), size)
        return buf

    return allreduce


def chain_allreduce(*hooks: Optional[AllReduce]) -> Optional[AllReduce]:
    """Compose sums over several groups (e.g. tensor-parallel, then a data-parallel subgroup
    that splits the same dimension further): the result is the sum over the product group."""
    active = [h for h in hooks if h is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def allreduce(x: Tensor) -> Tensor:
        for h in active:
            x = h(x)
        return x

    return allreduce


def even_shard(full: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, length)`` of shard ``index`` when ``full`` is split evenly into ``parts``
    (Megatron's rule: the size must divide; anything else is a ValueError)."""
    if parts < 1 or full % parts != 0:
        raise ValueError(f"cannot split a dimension of {full} evenly into {parts} tensor-parallel shards")
    if not 0 <= index < parts:
        raise ValueError(f"shard index {index} outside [0, {parts})")
    length = full // parts
    return index * length, length


def all_gather_shards(shard: Tensor, group: Group, dim: int, counter: Optional[CommCounter] = None,
                      tag: str = "tp") -> Tensor:
    """Concatenate every rank's ``shard`` along ``dim`` in group-rank order (the duplicated mode).

    All shards must have the same shape (Megatron splits evenly; :func:`even_shard`). The
    result is a new contiguous tensor; for a group of one it is ``shard`` itself.
    """
    size = group_size(group)
    if size == 1:
        return shard
    src = shard.contiguous()
    parts = [torch.empty_like(src) for _ in range(size)]
    dist.all_gather(parts, src, group=group)
    if counter is not None:
        counter.all_gather(tag, src.numel() * src.element_size(), size)
    return torch.cat(parts, dim=dim)


def own_slice(full: Tensor, group: Group, dim: int) -> Tensor:
    """This rank's even shard of ``full`` along ``dim`` (a view), the inverse of
    :func:`all_gather_shards`."""
    size = group_size(group)
    start, length = even_shard(full.size(dim), size, group_rank(group))
    return full.narrow(dim, start, length)
