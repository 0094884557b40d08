"""Atomic-module data-parallel sharding of :class:`~.sphere_optimizer.MegatronSphere` (SPEC §4).

**What is sharded: the compute.** Without the distributed optimizer, Megatron keeps a full copy
of every parameter and its optimizer state on every data-parallel rank and lets every rank run
the same update. For SSO that update (msign, the lambda solve, the power iteration) is most
of the step, so each rank here updates only the atomic modules that the plan
(:func:`megatron_sso.distributed.dp_plan.plan_dp`: zig-zag deal + refinement, cost =
elements x expected msign calls, whole modules) gives it, and then every rank receives the
owners' results: the module's weight, momentum and packed cache rows, copied bit for bit.

**What is not sharded: the state.** Momentum and the packed ``sphere_cache`` stay replicated
and parameter-shaped on every rank (memory like DDP without the distributed optimizer). This
keeps Megatron's torch_dist checkpoint unchanged (every per-parameter state tensor a
ShardedTensor of the parameter's shape) and lets a run resume with any DP size, at the price of
sending momentum and cache rows along with the weights (about twice the weight bytes). Sharding
the state too would need a new checkpoint layout and re-planning on load; ZeRO-style memory
savings are not the goal of this mode.

**Groups.** Dense modules shard over Megatron's ``dp_cp`` group (the ranks whose gradients DDP
averages: identical weights and gradients), routed experts over ``expt_dp``. A TP-split module
(duplicated mode) is owned by one DP rank: the TP group of that DP rank gathers it, updates it
and keeps its slices, then each TP rank sends its slice over its own DP group. The plan is a
pure function of the module shapes, so every rank of a DP group, and every TP peer, computes the
same owners; a fingerprint of the module list is compared across both groups once.

**Non-finite gradients.** Megatron's fp32 path never skips a step on NaN/Inf
(``FP32Optimizer.prepare_grads`` returns False; only DDP's ``check_for_nan_in_grad`` raises
before the all-reduce) and its bf16 path only with a grad scaler, whose ``found_inf`` is reduced
over the model-parallel group, not over DP: both assume that gradients are identical across
DP after the all-reduce. Here every rank flags each module whose gradient (its local view) is
non-finite or missing, the flags are summed over the DP group (and over TP for TP-split modules)
and every rank skips the same modules. With sharding, the owner's copy also overwrites every
other rank's, so ranks cannot drift apart even where gradients differ.

**Statistics.** Each rank's step statistics travel as one extra row of the same all-gather, so
``last_step_stats`` describes every module of the optimizer on every rank (what Megatron's
logger expects), while ``dp_owned_matrices`` says how many this rank updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ...distributed.comm import CommCounter, Group, assert_same_across, fingerprint, group_rank, group_size
from ...distributed.data_parallel import agree_flags, all_gather_pieces
from ...distributed.dp_plan import DPPlan, plan_dp
from ...distributed.module_inventory import plan_item
from ...optim.config import SphereConfig
from .layouts import AtomicModule

Tensor = torch.Tensor

GATHER_BUDGET_BYTES = 1 << 30
"""Most bytes one all-gather round receives (all ranks' buffers together). The owners' results
go out in as many rounds as needed, so the transient receive buffers stay below 1 GiB whatever
the model size (each round is one collective; a module is never cut)."""

STAT_FIELDS = ("num_matrices", "msign_calls", "max_abs_h", "max_abs_lambda", "skipped_nonfinite",
               "lambda_fallbacks", "lambda_above_tol", "cache_cold_restarts")
"""The step statistics per domain, in the order of the stats vector; per module kind three more
entries follow (max norm error, sum of update RMS, modules)."""
_MAX_COLUMNS = (2, 3)


def dp_groups_of(pg_collection: Any) -> dict[str, Group]:
    """Megatron's groups that hold identical copies of the sphere parameters: ``dp_cp`` (``dp``
    where absent) for dense modules, ``expt_dp`` for routed experts."""
    dense = getattr(pg_collection, "dp_cp", None) or getattr(pg_collection, "dp", None)
    return {"dense": dense, "expert": getattr(pg_collection, "expt_dp", None)}


@dataclass(frozen=True)
class ModuleRef:
    """Where one atomic module lives: ``param_groups[group]["params"][param]``, module
    ``module`` of its layout (positions survive Megatron's swap of model for main params)."""

    group: int
    param: int
    module: int


def stats_width(kinds: Sequence[str]) -> int:
    return len(STAT_FIELDS) + 3 * len(kinds)


def combine_stats(rows: Tensor) -> Tensor:
    """Reduce ``(R, S)`` stats rows to one: max for the max columns and each kind's norm error,
    sum for the rest."""
    out = rows.sum(dim=0)
    lo, hi = _MAX_COLUMNS[0], _MAX_COLUMNS[-1] + 1  # slices, not an index tensor: no host copy
    out[lo:hi] = rows[:, lo:hi].amax(dim=0)
    base = len(STAT_FIELDS)
    out[base::3] = rows[:, base::3].amax(dim=0)
    return out


class ShardDomain:
    """The modules of one parallel layout (dense or routed experts) of a MegatronSphere.

    Args:
        refs, mods: every module of the domain, in the optimizer's order (the same on all ranks).
        tp, dp: the domain's tensor- and data-parallel groups (``None``: size 1).
        shard: split the updates over ``dp`` (``sso_dp_shard``); otherwise every rank updates
            every module (the flags are still agreed, so all ranks skip the same ones).
        cfg: the sphere settings (expected msign calls for the cost, cache rows to send).
        dtype: the all-gather container, wide enough for every parameter of the domain (float32
            holds fp32 main params exactly; float64 when a parameter is float64).
    """

    def __init__(self, name: str, refs: list[ModuleRef], mods: list[AtomicModule], tp: Group, dp: Group,
                 shard: bool, cfg: SphereConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.name, self.refs, self.mods, self.tp, self.dp = name, refs, mods, tp, dp
        self.dtype = dtype
        self.world, self.me = group_size(dp), group_rank(dp)
        self.kinds = sorted({m.kind for m in mods})
        self.kind_index = {k: j for j, k in enumerate(self.kinds)}
        self.tp_split = [i for i, m in enumerate(mods) if m.tp_dim is not None]
        self._tp_index: Optional[Tensor] = None  # built on the first step, on the flags' device
        self.sharded = shard and self.world > 1
        if self.world > 1:  # flags and owners are positional: the lists must match
            assert_same_across(dp, fingerprint((m.name, m.full_shape, m.local_shape, m.tp_dim) for m in mods),
                               f"the {name} sphere module list (data parallel)", device)
            if group_size(tp) > 1:
                assert_same_across(tp, fingerprint((m.full_shape, m.local_shape, m.tp_dim) for m in mods),
                                   f"the {name} sphere module list (tensor parallel)", device)
        calls = float(cfg.lambda_evals if cfg.mode == "sso" else 1)
        # duplicated TP: every rank of the owner's TP group updates the full matrix
        items = [plan_item(m.full_shape, None, calls, cfg.msign_steps) for m in mods]
        self.plan: DPPlan = plan_dp(items, self.world if self.sharded else 1)
        self.owner = list(self.plan.owner) if self.sharded else [self.me] * len(mods)
        self.owned = [i for i, r in enumerate(self.owner) if r == self.me]
        self.rounds = self._rounds(cfg) if self.sharded else []

    def _rows_sent(self, i: int, cfg: SphereConfig) -> int:
        m, n = self.mods[i].local_shape
        if cfg.on_hyperball:  # the radius row (:mod:`.hyperball_bucket`)
            return 2 * m * n + n
        return 2 * m * n + (cache_rows(cfg, self.mods[i]) * n if cfg.on_sphere else 0)

    def _rounds(self, cfg: SphereConfig) -> list[list[list[int]]]:
        """Per all-gather round, per rank, the modules it sends (plan order), each rank's share
        of a round at most ``GATHER_BUDGET_BYTES / (world * itemsize)`` elements (or one module)."""
        cap = GATHER_BUDGET_BYTES // (self.dtype.itemsize * self.world)
        per_rank: list[list[list[int]]] = []
        for r in range(self.world):
            chunks, size = [[]], 0
            for i in (i for i, o in enumerate(self.owner) if o == r):
                n = self._rows_sent(i, cfg)
                if chunks[-1] and size + n > cap:
                    chunks.append([])
                    size = 0
                chunks[-1].append(i)
                size += n
            per_rank.append(chunks)
        count = max(len(c) for c in per_rank)
        return [[c[k] if k < len(c) else [] for c in per_rank] for k in range(count)]

    def agree_skips(self, local_bad: Tensor, counter: CommCounter) -> Tensor:
        """``(n,)`` bool, the modules every rank skips: ``local_bad`` (float, 1 where this rank
        saw a non-finite or missing gradient in the module's local view) summed over the DP group
        and, for TP-split modules, over the TP group (whose ranks update the module together)."""
        agree_flags(local_bad, self.dp, counter, "dp_agree")
        if self.tp_split and group_size(self.tp) > 1:
            if self._tp_index is None or self._tp_index.device != local_bad.device:
                self._tp_index = torch.tensor(self.tp_split, dtype=torch.long, device=local_bad.device)
            idx = self._tp_index  # once, not per step: a host list copied to the device waits for it
            local_bad[idx] = agree_flags(local_bad[idx].contiguous(), self.tp, counter, "tp_agree")
        return local_bad > 0

    def distribute(self, views_of: Callable[[int], list[Tensor]], local_stats: Tensor,
                   counter: CommCounter) -> Tensor:
        """Copy every owner's module views (``views_of(i)``: this rank's views of module ``i``)
        to all ranks of the DP group, and return the stats combined over the group."""
        rows = torch.zeros(self.world, local_stats.numel(), dtype=local_stats.dtype, device=local_stats.device)
        rows[self.me] = local_stats
        for k, per_rank in enumerate(self.rounds):
            views = [[v for i in mods for v in views_of(i)] + ([rows[r]] if k == 0 else [])
                     for r, mods in enumerate(per_rank)]
            all_gather_pieces(views, self.dp, counter, "dp", self.dtype)
        return combine_stats(rows)


def cache_rows(cfg: SphereConfig, mod: AtomicModule) -> int:
    """Rows of a module's packed cache that hold data: the cached block, lambda and slope."""
    return max(1, min(cfg.power_block, *mod.full_shape, mod.local_shape[0] - 2)) + 2  # cache_block + 2
