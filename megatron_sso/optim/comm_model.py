"""Bytes one rank sends per step to update one tensor-parallel matrix, sharded vs duplicated.

``sharded``: the exact sequence of all-reduces :func:`~megatron_sso.optim.sphere_update.sphere_update_`
issues, obtained by running it on the ``meta`` device (shapes only, no data, no time) with a
counting hook, so the count cannot drift from the code. In closed form, per warm SSO step of a
full ``m x n`` matrix split along ``d`` (``g``: the unsplit size, ``b``: the power block,
``k``: power iterations, ``e``: lambda evaluations, ``s``: Newton-Schulz steps), in float32
elements of payload:

* ``e (s g^2 + 2) + 4``: the Gram per NS iteration, ``||.||_F`` per msign and ``h`` per
  evaluation, plus ``||M||_F``, the skip flag and the two ``h`` of the final direction;
* with ``lambda_solver="krylov"`` the lambda part is ONE msign instead of ``e``:
  ``(s g^2 + 1) + (g + 1) + 2 g k_K + 2`` in ``k_K + s + 4`` all-reduces when the basis vectors
  are whole on every rank (Megatron's layouts: the long side split, ``g`` the short side):
  ``Y b`` with ``||Y||_F^2``, one ``g x 2`` block per Krylov product (``k_K = min(ceil(g/2),
  krylov_blocks)``), the msign, and ``h`` before and after the tangent projection. With the
  short side split the basis is split too: a product all-reduces ``2 x`` the long side, and the
  Gram-Schmidt inner products add 11 small all-reduces per block step
  (:mod:`megatron_sso.ops.krylov_space`). Measured by this module (TP=2, power_iters_cold=1):
  ``96 x 32`` rows split, secant 54 calls / 26122 floats, krylov 60 / 18983;
* power iteration (retraction product + ``k`` refinements, with Rayleigh-Ritz):
  ``d = 1``: ``(k + 2) m b + (2k + 6) b^2``; ``d = 0``: ``k n b + (2k + 6) b^2``.

``duplicated``: one all-gather of the weight shard and one of the gradient shard,
``(m n / P)`` elements each per rank. Ring model (``megatron_sso.distributed.comm``): an
all-reduce of ``S`` bytes sends ``2 (P-1)/P S`` per rank, an all-gather ``(P-1) S_rank``.
The optimizer adds one batched all-reduce of skip flags (2 floats per TP-split module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..distributed.comm import ring_allgather_bytes, ring_allreduce_bytes
from ..distributed.tensor_parallel import check_partition_dim, check_tp_mode, even_shard
from .config import SphereConfig
from .sphere_update import ShardHooks, SphereBuffers, sphere_update_


@dataclass(frozen=True)
class CommEstimate:
    """Per rank, per step: modelled bytes sent (ring), payload bytes, and collective calls."""

    wire_bytes: float
    payload_bytes: int
    calls: int


def _sharded(full_shape: tuple[int, int], tp: int, pdim: int, cfg: SphereConfig, warm: bool) -> CommEstimate:
    m, n = full_shape
    _, length = even_shard(full_shape[pdim], tp, 0)
    shape = (1, length, n) if pdim == 0 else (1, m, length)
    log: list[int] = []

    def count(x: torch.Tensor) -> torch.Tensor:
        log.append(x.numel() * x.element_size())
        return x

    meta = torch.device("meta")
    W = torch.empty(shape, device=meta)
    G = torch.empty(shape, device=meta)
    bufs = SphereBuffers(torch.zeros(shape, device=meta), None, torch.zeros(1, device=meta),
                         torch.ones(1, device=meta))
    hooks = ShardHooks(count, pdim, 0)
    for _ in range(2 if warm else 1):
        log.clear()
        sphere_update_(W, G, bufs, cfg, 1e-3, 1.0, 1.0, full_shape=full_shape, hooks=hooks)
    return CommEstimate(sum(ring_allreduce_bytes(b, tp) for b in log), sum(log), len(log))


def step_comm(full_shape: tuple[int, int], tp: int, partition_dim: int, mode: str = "sharded",
              cfg: Optional[SphereConfig] = None, warm: bool = True, grad_bytes: int = 4) -> CommEstimate:
    """Estimate one rank's communication to update one ``full_shape`` matrix split ``tp`` ways.

    Args:
        full_shape: ``(d_out, d_in)``.
        tp: tensor-parallel size (>= 1; 1 means no communication).
        partition_dim: 0 (column-parallel, rows split) or 1 (row-parallel, columns split).
        mode: ``"sharded"`` or ``"duplicated"``.
        cfg: the sphere configuration (default: the paper's).
        warm: a steady-state step (``False``: the module's first, with cold power iteration
            and ``lambda_cold_evals`` evaluations).
        grad_bytes: bytes per gradient element in the duplicated all-gather (4: fp32 main grads).
    """
    check_tp_mode(mode)
    check_partition_dim(partition_dim, allow_none=False)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    cfg = cfg or SphereConfig()
    if tp == 1:
        return CommEstimate(0.0, 0, 0)
    if mode == "sharded":
        return _sharded(full_shape, tp, partition_dim, cfg, warm)
    _, length = even_shard(full_shape[partition_dim], tp, 0)
    shard = length * full_shape[1 - partition_dim]
    w, g = shard * 4, shard * grad_bytes
    return CommEstimate(ring_allgather_bytes(w, tp) + ring_allgather_bytes(g, tp), (w + g) * tp, 2)
