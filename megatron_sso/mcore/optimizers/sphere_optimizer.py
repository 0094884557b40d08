"""The torch optimizer that Megatron's wrappers hold for the sphere-routed parameters.

It steps every atomic module (see :mod:`.layouts`) of its parameters with
:func:`megatron_sso.optim.sphere_update_`, batching same-shape modules of one param group into
one ``(B, m, n)`` call, and writes the results back into the modules' views of the parameter.

**State is checkpointable as is.** Megatron's torch_dist checkpoint turns every per-parameter
state tensor into a ShardedTensor *of the parameter's shape* (MEGATRON_FACTS). So each
parameter holds exactly:

* ``momentum_buffer`` -- fp32, the parameter's shape (each module's momentum is its view);
* ``sphere_cache`` -- fp32, the parameter's shape; inside each module's ``(m, n)`` view:
  rows ``[0, b)`` hold the cached right singular block transposed (``b x n``, ``b =
  min(power_block, m, n, local rows - 2)``, :func:`cache_block`), row ``b`` the last lambda root and row ``b + 1`` the last secant
  slope (each broadcast along the row, so every TP column shard holds them);
* ``step`` -- a 0-d count, equal for all parameters (Megatron saves it as ``common_step``); a
  module is warm (cached block and lambda valid) once ``step > 0`` and its cache passes
  :mod:`.cache_check` on the first step after a load (else it restarts cold: a resume at
  another TP size or ``power_block`` leaves some caches unusable).

**Tensor parallelism, duplicated mode.** A module whose ``tp_dim`` is set (row-parallel proj
and fc2, the gate/up halves of a TP-split fc1) is not whole on this rank: we all-gather weight,
gradient and momentum over the TP group, run the update on the full matrix (every rank the
same), and keep this rank's slice. Bytes moved are counted in the stats. A sharded mode (Gram
all-reduces through :class:`~megatron_sso.optim.ShardHooks`) can replace :meth:`_gather` /
:meth:`_keep_own` without touching the rest. Per-head QKV modules are whole: no communication.

**Data parallelism** (:mod:`.dp_shard`, ``sso_dp_shard``, on by default). The *compute* is
sharded by atomic module: each DP rank updates the modules the cost-balanced plan gives it and
the owners' weights, momentum and cache rows are all-gathered, so every rank ends bit-identical.
The *state* stays replicated and parameter-shaped (memory like DDP without the distributed
optimizer), which keeps the torch_dist checkpoint above unchanged and lets a run resume with
another DP size. Per-module skip decisions (non-finite or missing gradient) are agreed over the
DP group first, so every rank skips the same modules; the step count advances for every
parameter on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, Optional

import torch

from ...distributed.comm import CommCounter
from ...ops.lambda_solver import initial_slope
from ...ops.retraction import target_radius, update_scale
from ...optim.config import SphereConfig
from ...optim.index_cache import IndexCache
from ...optim.sphere_update import SphereBuffers, sphere_update_
from .cache_check import cold_restarts
from .dp_shard import STAT_FIELDS, ModuleRef, ShardDomain, combine_stats, stats_width
from .hyperball_bucket import HYPERBALL_CACHE_ROWS, step_hyperball_bucket
from .layouts import AtomicModule, ParamLayout
from .tp_modules import ModuleGatherMixin

Tensor = torch.Tensor
logger = logging.getLogger(__name__)
LAYOUT_ATTR = "_sso_layout"
"""Attribute naming a parameter's :class:`~.layouts.ParamLayout` (set by the factory on the
model parameter and copied to its fp32 main parameter)."""


def cache_block(cfg: SphereConfig, mod: AtomicModule) -> int:
    """Columns of the cached right block of ``mod``: ``power_block``, capped by the module's
    shape and by its local rows minus the two that hold lambda and the slope (a head of 16
    rows keeps a 14-column block)."""
    return max(1, min(cfg.power_block, *mod.full_shape, mod.local_shape[0] - 2))


def check_cache_fits(cfg: SphereConfig, layout: ParamLayout) -> None:
    """The packed cache needs ``b + 2 >= 3`` local rows per module; say which module is too small."""
    if not cfg.on_sphere:
        return
    for mod in layout.modules:
        if mod.local_shape[0] < 3:
            raise ValueError(
                f"atomic module {mod.name} has {mod.local_shape[0]} local rows; its checkpointable "
                "state needs at least 3 (a cached vector, lambda and the slope)"
            )


def init_sphere_state(opt: torch.optim.Optimizer, config: Any = None) -> None:
    """Megatron's ``init_state_fn``: create every state tensor (zeros) before a load."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt._state_for(p)


class MegatronSphere(ModuleGatherMixin, torch.optim.Optimizer):
    """SSO / MuonSphere / Muon / Muon-Hyperball over the atomic modules of Megatron parameters.

    Args:
        param_groups: Megatron param groups (``_get_param_groups``); the scheduler rewrites
            ``lr`` and ``weight_decay`` in them every step. Every parameter carries its layout
            in the :data:`LAYOUT_ATTR` attribute.
        cfg: the hyper-parameters.
        tp_groups: ``{"dense": group, "expert": group}`` TP process groups (``None``: size 1).
        dp_groups: the same for the groups holding identical copies (:func:`.dp_shard.dp_groups_of`;
            ``None``: every rank on its own, no agreement, no sharding).
        dp_shard: update each atomic module on one DP rank only and copy the result to the
            others (:mod:`.dp_shard`); ``False``: every rank updates every module.
    """

    def __init__(self, param_groups: list[dict], cfg: SphereConfig,
                 tp_groups: Optional[dict[str, Any]] = None, dp_groups: Optional[dict[str, Any]] = None,
                 dp_shard: bool = True) -> None:
        super().__init__(param_groups, {"lr": 1e-3, "weight_decay": 0.0})
        self.cfg = cfg
        self.tp_groups = tp_groups or {}
        self.dp_groups = dp_groups or {}
        self.dp_shard = bool(dp_shard)
        self.gather_bytes = 0
        self.counter = CommCounter()  # DP traffic since construction
        self._domains: Optional[list[ShardDomain]] = None
        self._stats: dict[str, Tensor] = {}
        self._owned = 0
        self._check_caches = True  # on the first step after construction or a load (.cache_check)
        self._restart: dict[str, set[int]] = {}
        self._index = IndexCache()  # the step's index lists, made on their device once

    # ------------------------------------------------------------------ state
    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if self.cfg.on_sphere or self.cfg.on_hyperball:  # hyperball: radii, :mod:`.hyperball_bucket`
                state["sphere_cache"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            # On the host on purpose (like torch.optim's non-capturable ``step``): the warm test
            # in :meth:`step` reads it without waiting for the device.
            state["step"] = torch.zeros((), dtype=torch.float32, device="cpu")
        return state

    def _param(self, ref: ModuleRef) -> Tensor:
        return self.param_groups[ref.group]["params"][ref.param]

    def _build_domains(self) -> list[ShardDomain]:
        found: dict[str, tuple[list, list]] = {"dense": ([], []), "expert": ([], [])}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                layout: ParamLayout = getattr(p, LAYOUT_ATTR)
                refs, mods = found["expert" if layout.expert else "dense"]
                for mi, mod in enumerate(layout.modules):
                    refs.append(ModuleRef(gi, pi, mi))
                    mods.append(mod)
        out = []
        for name, (refs, mods) in found.items():
            if refs:
                params = [self._param(r) for r in refs]
                dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
                out.append(ShardDomain(name, refs, mods, self.tp_groups.get(name), self.dp_groups.get(name),
                                       self.dp_shard, self.cfg, params[0].device, dtype))
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._domains is None:
            self._domains = self._build_domains()
        warm = {}
        for group in self.param_groups:  # state is replicated: every rank counts every parameter
            for p in group["params"]:
                state = self._state_for(p)
                warm[p] = bool(state["step"] > 0)
                state["step"] += 1
        self._owned = 0
        self._restart = {}
        if self._check_caches and self.cfg.on_sphere:
            self._restart = {d.name: cold_restarts(self, d, warm, lambda mod: cache_block(self.cfg, mod), LAYOUT_ATTR)
                             for d in self._domains}
            restarted = [d.mods[i].name for d in self._domains for i in sorted(self._restart[d.name])]
            if restarted:
                logger.warning("megatron_sso: %d sphere module(s) had an unusable cached block after the load "
                               "(another TP size or sso_power_block?) and restart cold: %s", len(restarted),
                               ", ".join(restarted[:8]) + (" ..." if len(restarted) > 8 else ""))
        self._check_caches = False
        self._stats = {d.name: self._step_domain(d, warm) for d in self._domains}
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._check_caches = True

    def _step_domain(self, d: ShardDomain, warm: dict) -> Tensor:
        device = self._param(d.refs[0]).device
        if d.world > 1:  # every rank skips what any rank cannot step
            skip = d.agree_skips(self._local_flags(d, device), self.counter)
        else:  # one rank: the update checks finiteness itself (gathered over TP)
            missing = [self._param(r).grad is None for r in d.refs]
            skip = None
            if any(missing):
                skip = torch.zeros(len(missing), dtype=torch.bool, device=device)
                skip[self._index([i for i, gone in enumerate(missing) if gone], device)] = True
        buckets: dict[tuple, list] = defaultdict(list)
        for i in d.owned:
            ref, mod = d.refs[i], d.mods[i]
            p = self._param(ref)
            key = (ref.group, mod.full_shape, mod.local_shape, mod.tp_dim,
                   warm[p] and i not in self._restart.get(d.name, ()))
            buckets[key].append((i, p, self.state[p], mod, getattr(p, LAYOUT_ATTR)))
        batches, kinds = [], defaultdict(list)
        for (gi, _, _, _, is_warm), entries in buckets.items():
            group = self.param_groups[gi]
            cfg = self.cfg
            if cfg.mode == "muon":  # Megatron's scheduled decoupled decay (wd_mult applied)
                cfg = dataclasses.replace(cfg, weight_decay=float(group.get("weight_decay", 0.0)))
            sel = None if skip is None else skip[self._index([e[0] for e in entries], device)]
            batches.append(self._step_bucket(entries, cfg, float(group["lr"]), is_warm, kinds, sel))
            self._owned += len(entries)
        local = self._local_stats(d, batches, kinds, device)
        restarted = self._restart.get(d.name)
        if restarted:  # counted by the owner, so the DP sum counts each module once
            local[STAT_FIELDS.index("cache_cold_restarts")] = float(sum(i in restarted for i in d.owned))
        if not d.sharded:
            return local
        return d.distribute(lambda i: self._views(d, i), local, self.counter)

    def _local_flags(self, d: ShardDomain, device) -> Tensor:
        """1.0 per module whose local gradient view is non-finite or missing (modules of one
        parameter are contiguous in ``d.refs``: one non-finite mask alive at a time)."""
        out, current, mask = [], None, None
        missing = torch.ones((), dtype=torch.bool, device=device)
        for ref, mod in zip(d.refs, d.mods):
            p = self._param(ref)
            if p is not current:
                current, mask = p, (None if p.grad is None else ~torch.isfinite(p.grad))
            out.append(missing if mask is None else mod.view(mask).any())
        return torch.stack(out).float()

    def _views(self, d: ShardDomain, i: int) -> list[Tensor]:
        """What the owner of module ``i`` sends: its weight, momentum and packed cache rows."""
        p, mod = self._param(d.refs[i]), d.mods[i]
        state = self.state[p]
        out = [mod.view(p.data), mod.view(state["momentum_buffer"])]
        if self.cfg.on_sphere:
            out.append(mod.view(state["sphere_cache"])[:cache_block(self.cfg, mod) + 2])
        elif self.cfg.on_hyperball:
            out.append(mod.view(state["sphere_cache"])[:HYPERBALL_CACHE_ROWS])
        return out

    @staticmethod
    def _stacked(entries: list):
        """``stacked(fn)``: ``fn(param, state, module)`` of every entry of a same-shape bucket, as one
        ``(B, ...)`` fp32 tensor."""
        return lambda fn: torch.stack([fn(p, s, mod).float() for _, p, s, mod, _ in entries])

    def _gather_bucket(self, entries: list) -> tuple[Tensor, Tensor, Tensor]:
        """The bucket's whole modules ``(W, G, momentum)``, each ``(B, m, n)`` fp32, TP shards
        all-gathered; a missing gradient reads as zeros (the step skips it through ``skip``)."""
        _, _, _, mod0, layout0 = entries[0]
        stacked = self._stacked(entries)

        def grad(p, mod) -> Tensor:
            return mod.view(p.grad) if p.grad is not None else torch.zeros(mod.local_shape, device=p.device)

        return tuple(self._gather(stacked(fn), mod0, layout0) for fn in (
            lambda p, s, mod: mod.view(p), lambda p, s, mod: grad(p, mod),
            lambda p, s, mod: mod.view(s["momentum_buffer"])))

    def _step_bucket(self, entries: list, cfg: SphereConfig, lr: float, warm: bool, kinds,
                     skip: Optional[Tensor]) -> Any:
        if cfg.on_hyperball:
            return step_hyperball_bucket(self, entries, cfg, lr, kinds, skip)
        _, p0, _, mod0, layout0 = entries[0]
        m, n = mod0.full_shape
        b = cache_block(cfg, mod0)
        if cfg.power_block > b:  # the block the update computes must fit the packed cache
            cfg = dataclasses.replace(cfg, power_block=b)

        stacked = self._stacked(entries)
        W, G, M = self._gather_bucket(entries)
        B = W.size(0)
        block = None
        lam = torch.zeros(B, device=W.device)
        slope = torch.full((B,), initial_slope(m, n), device=W.device)
        if cfg.on_sphere and warm:
            cache = stacked(lambda p, s, mod: mod.view(s["sphere_cache"]))
            vt = cache[:, :b]
            if mod0.tp_dim == 1:  # right vectors are split like the columns
                vt = self._gather(vt, mod0, layout0)
            block = vt.transpose(-1, -2).contiguous()
            lam, slope = cache[:, b, 0].clone(), cache[:, b + 1, 0].clone()
        before = W.clone()
        bufs = SphereBuffers(momentum=M, right_block=block, lam=lam, slope=slope,
                             lambda_warm=warm and cfg.lambda_solver == "secant")
        radius = target_radius(m, n, cfg.radius_mode, cfg.radius_scaler)
        stats = sphere_update_(W, G, bufs, cfg, lr, radius, update_scale(m, n, cfg.scale_mode),
                               full_shape=(m, n), skip=skip)
        for i, (_, p, s, mod, layout) in enumerate(entries):
            mod.view(p).copy_(self._keep_own(W[i], mod, layout))
            mod.view(s["momentum_buffer"]).copy_(self._keep_own(bufs.momentum[i], mod, layout))
            if cfg.on_sphere:
                cview = mod.view(s["sphere_cache"])
                vt_full = bufs.right_block[i].transpose(0, 1)
                cview[:b].copy_(vt_full if mod.tp_dim != 1 else self._keep_own(vt_full, mod, layout))
                cview[b].copy_(bufs.lam[i].expand_as(cview[b]))
                cview[b + 1].copy_(bufs.slope[i].expand_as(cview[b + 1]))
        rms = (W - before).flatten(1).norm(dim=1) / (m * n) ** 0.5
        err = (stats.sigma / radius - 1.0).abs() if stats.sigma is not None else torch.zeros_like(rms)
        by_kind = defaultdict(list)
        for i, (_, _, _, mod, _) in enumerate(entries):
            by_kind[mod.kind].append(i)
        for kind, idx in by_kind.items():
            sel = self._index(idx, W.device)
            count = torch.full((), float(len(idx)), device=W.device)  # on W's device: stack refuses a mix
            kinds[kind].append(torch.stack([err[sel].max(), rms[sel].sum(), count]))
        return stats

    # ------------------------------------------------------------------ stats
    @staticmethod
    def _local_stats(d: ShardDomain, batches: list, kinds: dict, device) -> Tensor:
        """This rank's stats vector for domain ``d`` (layout: :data:`.dp_shard.STAT_FIELDS`,
        then per kind of ``d.kinds``: max norm error, sum of update RMS, modules)."""
        out = torch.zeros(stats_width(d.kinds), device=device)
        if batches:
            out[0] = float(sum(b.num_matrices for b in batches))
            out[1] = float(sum(b.msign_calls for b in batches))
            out[2] = torch.stack([b.max_abs_h.float() for b in batches]).max()
            out[3] = torch.stack([b.max_abs_lambda.float() for b in batches]).max()
            out[4] = torch.stack([b.skipped.float() for b in batches]).sum()
            out[5] = torch.stack([b.fallbacks.float() for b in batches]).sum()
            out[6] = torch.stack([b.above_tol.float() for b in batches if b.above_tol is not None]
                                 or [out[6]]).sum()
        base = len(STAT_FIELDS)
        for kind, rows in kinds.items():
            t = torch.stack(rows).to(device)
            j = base + 3 * d.kind_index[kind]
            out[j], out[j + 1], out[j + 2] = t[:, 0].max(), t[:, 1].sum(), t[:, 2].sum()
        return out

    @property
    def last_step_stats(self) -> dict[str, float]:
        """The last step's solver totals over *every* module of this optimizer (gathered over
        DP when sharded): ``num_matrices``, ``msign_calls``, ``msign_calls_per_matrix``,
        ``max_abs_h``, ``max_abs_lambda``, ``skipped_nonfinite`` (non-finite or missing
        gradient), ``lambda_fallbacks``; and ``dp_owned_matrices`` (updated by this rank),
        ``max_dp_imbalance`` (planned max/mean cost), ``tp_gather_bytes``, ``dp_gather_bytes``
        and ``dp_agree_bytes`` (ring-model bytes this rank sent since construction). Reading
        synchronises once."""
        out: dict[str, float] = {}
        if self._stats:
            head = combine_stats(torch.stack([v[:len(STAT_FIELDS)] for v in self._stats.values()]))
            out = dict(zip(STAT_FIELDS, head.tolist()))
            for key in ("num_matrices", "msign_calls", "skipped_nonfinite", "lambda_fallbacks", "lambda_above_tol",
                        "cache_cold_restarts"):
                out[key] = int(round(out[key]))
            out["msign_calls_per_matrix"] = out["msign_calls"] / max(out["num_matrices"], 1)
            out["max_dp_imbalance"] = max(d.plan.imbalance for d in self._domains)
        out["dp_owned_matrices"] = self._owned
        out["tp_gather_bytes"] = self.gather_bytes
        out["dp_gather_bytes"] = self.counter.wire.get("dp", 0.0)
        out["dp_agree_bytes"] = self.counter.wire.get("dp_agree", 0.0) + self.counter.wire.get("tp_agree", 0.0)
        return out

    def kind_stats(self) -> dict[str, dict[str, float]]:
        """Per module kind (``qkv_q``, ``gate``, ``linear_proj``...) over every module:
        ``max_norm_error`` (max ``|sigma/R - 1|`` of the weights the last forward pass used, by
        the optimizer's own estimate: the Ritz value of the cached block the previous step retracted
        with, so ~1e-7 after a module's first step; logged as ``start_norm_error``, the independent
        figure is :func:`~megatron_sso.mcore.observe.sphere_logging.sampled_norm_errors`;
        0 for Muon; ``| ||W||_F / R - 1 |`` for Muon-Hyperball), ``update_rms`` (mean RMS of the applied change) and ``modules``."""
        out = {}
        base = len(STAT_FIELDS)
        for d in self._domains or []:
            if d.name not in self._stats:
                continue
            vec = self._stats[d.name].tolist()
            for kind, j in d.kind_index.items():
                err, rms, count = vec[base + 3 * j: base + 3 * j + 3]
                if count > 0:
                    out[kind] = {"max_norm_error": err, "update_rms": rms / count, "modules": int(round(count))}
        return out
