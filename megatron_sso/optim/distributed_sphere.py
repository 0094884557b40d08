"""``DistributedSpectralSphere``: SSO, MuonSphere and Muon over atomic modules and process groups.

Per step, per *domain* (dense modules on the tensor- and data-parallel groups; MoE experts on
the expert-tensor- and expert-data-parallel groups, SPEC §4):

1. every rank checks each module's gradient (its local view) for NaN/Inf; one all-reduce of
   the flag vector over the DP group, one over the TP group for the TP-split modules, so that
   every rank skips the same matrices (no divergence between ranks);
2. each rank updates the units the data-parallel plan (:func:`~megatron_sso.distributed.dp_plan.plan_dp`,
   zig-zag + refinement, balanced by cost) gave it, batched by shape: local modules with no
   communication, TP shards with the sharded math or duplicated, split pieces over their
   subgroup; collective units run in one global order (deadlock-free);
3. the updated weights are all-gathered over the DP group, so every rank is bit-identical.

:attr:`last_step_stats` has SpectralSphere's keys (for this rank's units) plus the bytes this
rank sent (``comm_bytes``, per group in ``comm_bytes_tp``, ``comm_bytes_dp``,
``comm_bytes_dp_split``), the plans' ``imbalance`` (``expert_imbalance``) and this rank's
planned share of the cost (``cost_share``: its load / mean load). A module without a
gradient is skipped like a non-finite one and counted in ``skipped_no_grad``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch

from ..distributed.atomic import AtomicModule
from ..distributed.comm import (CommCounter, Group, assert_same_across, fingerprint, group_rank,
                                group_size)
from ..distributed.data_parallel import SubgroupCache, SubgroupFactory, agree_flags, all_gather_pieces
from ..distributed.dp_plan import DEFAULT_TOLERANCE, DPPlan, PlanItem, check_cost_model, plan_dp
from ..distributed.module_inventory import plan_item, split_dim_of
from ..distributed.tensor_parallel import chain_allreduce, check_tp_mode, even_shard, make_allreduce
from .config import SphereConfig
from .index_cache import IndexCache
from .sharded_units import Unit, step_batch
from .step_stats import StepStats

Tensor = torch.Tensor


class _Domain:
    """The modules of one parallel layout (dense or expert), their plan and this rank's units."""

    def __init__(self, name: str, modules: list[AtomicModule], tp: Group, dp: Group, base: int,
                 opt: "DistributedSpectralSphere") -> None:
        self.name, self.modules, self.tp, self.dp, self.base = name, modules, tp, dp, base
        tp_size = group_size(tp)
        self.tp_split = [i for i, m in enumerate(modules) if self._is_tp_split(m, tp_size)]
        split_set = set(self.tp_split)
        cfg = opt.config
        calls = float(cfg.lambda_evals if cfg.mode == "sso" else 1)
        items: list[PlanItem] = []
        for i, m in enumerate(modules):
            if i in split_set and opt.tp_mode == "duplicated":
                d, full = m.partition_dim, m.full_shape
                self._check_even(m, tp)
                items.append(PlanItem(full[d], full[1 - d], calls, False, cfg.msign_steps))
            elif i in split_set:
                items.append(PlanItem(m.shape[m.partition_dim], m.full_shape[1 - m.partition_dim],
                                      calls, True, cfg.msign_steps))
            else:
                items.append(plan_item(m.shape, None, calls, cfg.msign_steps))
        if opt.check_consistency:
            sig = fingerprint(m.signature() for m in modules)
            assert_same_across(dp, sig, f"the {name} module list", opt.device)
            assert_same_across(tp, sig, f"the {name} module list", opt.device)
        self.plan: DPPlan = plan_dp(items, group_size(dp), model=opt.cost_model, split=opt.dp_split,
                                    tolerance=opt.imbalance_tolerance)
        self.me = group_rank(dp)
        self.index = IndexCache()  # the index lists of a step, made on their device once
        tp_ar = make_allreduce(tp, opt.counter, "tp")
        cache = SubgroupCache(dp, opt.subgroup_factory)
        self.units: list[Unit] = []
        self.pieces: list[tuple[int, Optional[int], int, int]] = []  # (owner, dim, start, length)
        for p, owner in zip(self.plan.pieces, self.plan.owner):
            m = modules[p.item]
            tp_split = p.item in split_set
            dim = (m.partition_dim if tp_split else split_dim_of(m.shape, None)) if p.parts > 1 else None
            self.pieces.append((owner, dim, p.start, p.length))
            if owner != self.me:
                continue
            key = base + p.item
            if p.parts > 1:
                sub = cache.get(self.plan.ranks_of(p.item))
                ar = chain_allreduce(tp_ar if tp_split else None, make_allreduce(sub, opt.counter, "dp_split"))
                offset = (m.tp_offset if tp_split else 0) + p.start
                unit = Unit(key, p.item, m, "split", dim, p.start, p.length, dim, offset, ar)
            elif tp_split and opt.tp_mode == "sharded":
                unit = Unit(key, p.item, m, "tp", pdim=m.partition_dim, offset=m.tp_offset, allreduce=tp_ar)
            elif tp_split:
                unit = Unit(key, p.item, m, "dup", pdim=m.partition_dim, offset=m.tp_offset, gather_group=tp)
            else:
                unit = Unit(key, p.item, m, "local")
            self.units.append(unit)

    @staticmethod
    def _is_tp_split(m: AtomicModule, tp_size: int) -> bool:
        if m.partition_dim is None:
            return False
        if tp_size == 1:
            if m.shape != m.full_shape:
                raise ValueError(f"{m.name or 'module'}: a shard {m.shape} of {m.full_shape} needs a TP group")
            return False
        return True

    @staticmethod
    def _check_even(m: AtomicModule, tp: Group) -> None:
        start, length = even_shard(m.full_shape[m.partition_dim], group_size(tp), group_rank(tp))
        if (m.tp_offset, m.shape[m.partition_dim]) != (start, length):
            raise ValueError(
                f"{m.name or 'module'}: duplicated mode needs Megatron's even shards in rank order; "
                f"rank {group_rank(tp)} holds [{m.tp_offset}, +{m.shape[m.partition_dim]}), expected [{start}, +{length})"
            )

    def agree_skips(self, grad_attr: str, counter: CommCounter, device: torch.device) -> Tensor:
        """Per module: skip its step (non-finite or missing gradient on any rank)."""
        n = len(self.modules)
        flags = torch.zeros(2 * n, dtype=torch.float32, device=device)
        if n == 0:  # the same on every rank of the group: no collective
            return flags
        bad = []
        for i, m in enumerate(self.modules):
            g = m.grad(grad_attr)
            if g is None:
                flags[n + i] = 1.0
                bad.append(torch.zeros((), dtype=torch.bool, device=device))
            else:
                bad.append((~torch.isfinite(g)).any().to(device))
        flags[:n] += torch.stack(bad).float()
        agree_flags(flags, self.dp, counter, "dp")
        if self.tp_split and group_size(self.tp) > 1:
            idx = self.index(self.tp_split + [n + i for i in self.tp_split], device)
            flags[idx] = agree_flags(flags[idx].contiguous(), self.tp, counter, "tp")
        return flags

    def gather(self, counter: CommCounter) -> None:
        views: list[list[Tensor]] = [[] for _ in range(self.plan.world)]
        for p, (owner, dim, start, length) in zip(self.plan.pieces, self.pieces):
            w = self.modules[p.item].weight()
            views[owner].append(w if dim is None else w.narrow(dim, start, length))
        dtype = torch.float64 if any(m.param.dtype == torch.float64 for m in self.modules) else torch.float32
        all_gather_pieces(views, self.dp, counter, "dp", dtype)


class DistributedSpectralSphere(torch.optim.Optimizer):
    """SSO (and relatives) over :class:`~megatron_sso.distributed.atomic.AtomicModule` s.

    Args:
        modules: this rank's atomic modules, in an order that is the same on every rank of
            its data-parallel group and, position by position, matching on its TP peers.
        lr: learning rate (param group 0's ``lr``; a scheduler may rewrite it).
        mode: ``"sso"``, ``"muon_sphere"`` or ``"muon"``.
        tp_group, dp_group: dense tensor- and data-parallel groups (``None``: size 1).
        expert_tp_group, expert_dp_group: the same for modules with ``expert=True``.
        tp_mode: ``"sharded"`` (sharded math) or ``"duplicated"`` (gather, update whole, slice).
        cost_model: ``"numel"`` or ``"flops"`` (see :mod:`megatron_sso.distributed.dp_plan`).
        dp_split: ``"never"`` (whole modules) or ``"auto"`` (cut modules when the whole-module
            plan's imbalance exceeds ``imbalance_tolerance``).
        grad_attr: where the gradient lives (``"grad"``; ``"main_grad"`` in Megatron).
        subgroup_factory: creates split pieces' groups from global ranks (default
            ``torch.distributed.new_group`` with local synchronisation).
        check_consistency: compare module lists across groups once at construction.
        **config: any other :class:`~megatron_sso.optim.config.SphereConfig` field.
    """

    def __init__(self, modules: Sequence[AtomicModule], lr: float = 5e-3, *, mode: str = "sso",
                 tp_group: Group = None, dp_group: Group = None,
                 expert_tp_group: Group = None, expert_dp_group: Group = None,
                 tp_mode: str = "sharded", cost_model: str = "numel", dp_split: str = "never",
                 imbalance_tolerance: float = DEFAULT_TOLERANCE, grad_attr: str = "grad",
                 subgroup_factory: Optional[SubgroupFactory] = None, check_consistency: bool = True,
                 **config: Any) -> None:
        modules = list(modules)
        if not modules:
            raise ValueError("DistributedSpectralSphere needs at least one atomic module, got none")
        for m in modules:
            if not isinstance(m, AtomicModule):
                raise ValueError(f"modules must be AtomicModule descriptors, got {type(m).__name__}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, got lr={lr!r}")
        unknown = set(config) - set(SphereConfig.field_names())
        if unknown:
            raise ValueError(f"unknown DistributedSpectralSphere option(s) {sorted(unknown)}")
        self.config = SphereConfig(mode=mode, **config)
        if self.config.on_hyperball:
            raise ValueError("DistributedSpectralSphere does not offer mode='hyperball' yet; use SpectralSphere "
                             "or Megatron's optimizer='muon_hyperball' (MegatronSphere)")
        self.tp_mode = check_tp_mode(tp_mode)
        self.cost_model = check_cost_model(cost_model)
        if dp_split not in ("never", "auto"):
            raise ValueError(f"unknown dp_split {dp_split!r}; choose 'never' or 'auto'")
        self.dp_split = dp_split
        self.imbalance_tolerance = imbalance_tolerance
        self.grad_attr = grad_attr
        self.subgroup_factory = subgroup_factory
        self.check_consistency = check_consistency
        self.device = modules[0].param.device
        self.counter = CommCounter()
        params, seen = [], set()
        for m in modules:
            if id(m.param) not in seen:
                seen.add(id(m.param))
                params.append(m.param)
        super().__init__(params, {"lr": lr})
        dense = [m for m in modules if not m.expert]
        expert = [m for m in modules if m.expert]
        self.domains = [_Domain("dense", dense, tp_group, dp_group, 0, self)]
        if expert:
            self.domains.append(_Domain("expert", expert, expert_tp_group, expert_dp_group, len(dense), self))
        self._last: dict[str, float] = {}
        self._last_stats: Optional[StepStats] = None
        self._no_grad = torch.zeros((), device=self.device)

    @property
    def plans(self) -> dict[str, DPPlan]:
        """The data-parallel plan of each domain (``"dense"``, ``"expert"``)."""
        return {d.name: d.plan for d in self.domains}

    @property
    def units(self) -> list[Unit]:
        """What this rank updates (all domains)."""
        return [u for d in self.domains for u in d.units]

    @property
    def last_step_stats(self) -> dict[str, float]:
        """See the module docstring; reading it synchronises with the device once."""
        if self._last_stats is None:
            return {}
        out = self._last_stats.as_dict()
        out.update(self._last)
        missing = int(self._no_grad)
        out["skipped_no_grad"] = missing
        out["skipped_nonfinite"] -= missing
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's dict (param groups; ``state`` is empty: nothing is kept per parameter) plus
        ``unit_state``: each of this rank's units' state (momentum, cached singular block,
        lambda, slope, warm flag) under :meth:`Unit.state_key`. The tensors are the live ones,
        as in torch's own ``state_dict``; ``torch.save`` copies them."""
        out = super().state_dict()
        out["unit_state"] = {u.state_key(): dict(u.state) for u in self.units if u.state}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved by an optimizer over the same modules and groups
        (the same plan, so the same units on this rank); a unit missing on either side or a
        tensor of another shape is a ValueError naming it. Tensors are copied to the unit's
        device; the run continues exactly as if it had not stopped."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("unit_state", None)
        if saved is None:
            raise ValueError("this state dict has no 'unit_state' (not saved by DistributedSpectralSphere)")
        units = {u.state_key(): u for u in self.units}
        extra = sorted(set(saved) - set(units))
        if extra:
            raise ValueError(f"saved state for units {extra} that this rank does not update (another "
                             f"module list, group size or plan); this rank's units: {sorted(units)}")
        super().load_state_dict(state_dict)
        for key, unit in units.items():
            if key not in saved:
                unit.state.clear()  # never stepped when saved: starts cold, as it would have
                continue
            restored = {}
            for name, value in saved[key].items():
                if isinstance(value, Tensor):
                    old = unit.state.get(name)
                    if old is not None and old.shape != value.shape:
                        raise ValueError(f"unit {key}: saved {name} has shape {tuple(value.shape)}, "
                                         f"this optimizer's has {tuple(old.shape)}")
                    value = value.detach().to(device=unit.weight().device, copy=True)
                restored[name] = value
            unit.state.clear()
            unit.state.update(restored)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = float(self.param_groups[0]["lr"])
        self.counter.reset()
        batches = []
        no_grad = torch.zeros((), device=self.device)
        for d in self.domains:
            flags = d.agree_skips(self.grad_attr, self.counter, self.device)
            n = len(d.modules)
            skip = (flags[:n] + flags[n:]) > 0
            groups: dict[tuple, list[Unit]] = defaultdict(list)
            for u in d.units:
                groups[u.batch_key()].append(u)
            # Local batches need no peers; collective ones run in the global key order.
            ordered = sorted(groups.values(), key=lambda us: (us[0].kind != "local", min(u.key for u in us)))
            for us in ordered:
                idx = d.index([u.item for u in us], self.device)
                batches.append(step_batch(us, self.config, lr, skip[idx], self.grad_attr, self.counter))
                no_grad = no_grad + ((flags[n + idx] > 0) & (flags[idx] == 0)).sum()
            d.gather(self.counter)
        self._last_stats = StepStats.from_batches(batches)
        self._last = dict(self.counter.as_dict())
        for d in self.domains:
            prefix = "" if d.name == "dense" else f"{d.name}_"
            self._last[f"{prefix}imbalance"] = d.plan.imbalance
            self._last[f"{prefix}cost_share"] = d.plan.loads[d.me] * d.plan.world / max(sum(d.plan.loads), 1e-300)
        self._no_grad = no_grad
        return loss
