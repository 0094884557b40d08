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
  min(power_block, m, n)``), row ``b`` the last lambda root and row ``b + 1`` the last secant
  slope (each broadcast along the row, so every TP column shard holds them);
* ``step`` -- a 0-d count, equal for all parameters (Megatron saves it as ``common_step``); a
  module is warm (cached block and lambda valid) once ``step > 0``.

**Tensor parallelism, duplicated mode.** A module whose ``tp_dim`` is set (row-parallel proj
and fc2, the gate/up halves of a TP-split fc1) is not whole on this rank: we all-gather weight,
gradient and momentum over the TP group, run the update on the full matrix (every rank the
same), and keep this rank's slice. Bytes moved are counted in the stats. A sharded mode (Gram
all-reduces through :class:`~megatron_sso.optim.ShardHooks`) can replace :meth:`_gather` /
:meth:`_keep_own` without touching the rest. Per-head QKV modules are whole: no communication.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..ops.lambda_solver import initial_slope
from ..ops.retraction import target_radius, update_scale
from ..optim.config import SphereConfig
from ..optim.sphere_update import SphereBuffers, sphere_update_
from ..optim.step_stats import StepStats
from .layouts import AtomicModule, ParamLayout

Tensor = torch.Tensor
LAYOUT_ATTR = "_sso_layout"
"""Attribute naming a parameter's :class:`~.layouts.ParamLayout` (set by the factory on the
model parameter and copied to its fp32 main parameter)."""


def cache_block(cfg: SphereConfig, mod: AtomicModule) -> int:
    """Columns of the cached right block of ``mod`` (``power_block`` capped by its shape)."""
    return max(1, min(cfg.power_block, *mod.full_shape))


def check_cache_fits(cfg: SphereConfig, layout: ParamLayout) -> None:
    """The packed cache needs ``b + 2`` local rows per module; say which module is too small."""
    if not cfg.on_sphere:
        return
    for mod in layout.modules:
        b = cache_block(cfg, mod)
        if mod.local_shape[0] < b + 2:
            raise ValueError(
                f"atomic module {mod.name} has {mod.local_shape[0]} local rows; its checkpointable "
                f"state needs power_block + 2 = {b + 2} (set sso_power_block <= {mod.local_shape[0] - 2})"
            )


def init_sphere_state(opt: torch.optim.Optimizer, config: Any = None) -> None:
    """Megatron's ``init_state_fn``: create every state tensor (zeros) before a load."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt._state_for(p)


class MegatronSphere(torch.optim.Optimizer):
    """SSO / MuonSphere / Muon over the atomic modules of Megatron parameters.

    Args:
        param_groups: Megatron param groups (``_get_param_groups``); the scheduler rewrites
            ``lr`` and ``weight_decay`` in them every step. Every parameter carries its layout
            in the :data:`LAYOUT_ATTR` attribute.
        cfg: the hyper-parameters.
        tp_groups: ``{"dense": group, "expert": group}`` TP process groups (``None``: size 1).
    """

    def __init__(self, param_groups: list[dict], cfg: SphereConfig,
                 tp_groups: Optional[dict[str, Any]] = None) -> None:
        super().__init__(param_groups, {"lr": 1e-3, "weight_decay": 0.0})
        self.cfg = cfg
        self.tp_groups = tp_groups or {}
        self.gather_bytes = 0
        self._last: Optional[StepStats] = None
        self._kinds: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ state
    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if self.cfg.on_sphere:
                state["sphere_cache"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["step"] = torch.zeros((), dtype=torch.float32)
        return state

    def _group_of(self, layout: ParamLayout):
        return self.tp_groups.get("expert" if layout.expert else "dense")

    # ------------------------------------------------------------ TP (duplicated)
    def _gather(self, local: Tensor, mod: AtomicModule, layout: ParamLayout, dim_offset: int = 1) -> Tensor:
        """All-gather a stacked ``(B, m_l, n_l)`` batch along the module's TP dim."""
        if mod.tp_dim is None:
            return local
        group = self._group_of(layout)
        size = dist.get_world_size(group)
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        self.gather_bytes += local.numel() * local.element_size() * (size - 1)
        return torch.cat(pieces, dim=mod.tp_dim + dim_offset)

    def _keep_own(self, full: Tensor, mod: AtomicModule, layout: ParamLayout) -> Tensor:
        """This rank's slice of a full ``(m, n)`` module."""
        if mod.tp_dim is None:
            return full
        rank = dist.get_rank(self._group_of(layout))
        local = mod.local_shape[mod.tp_dim]
        return full.narrow(mod.tp_dim, rank * local, local)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches, kinds = [], defaultdict(list)
        for group in self.param_groups:
            cfg = self.cfg
            if not cfg.on_sphere:  # Muon: Megatron's scheduled decoupled decay (wd_mult applied)
                cfg = dataclasses.replace(cfg, weight_decay=float(group.get("weight_decay", 0.0)))
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p)
                warm = bool(state["step"] > 0)
                state["step"] += 1
                layout: ParamLayout = getattr(p, LAYOUT_ATTR)
                for mod in layout.modules:
                    key = (mod.full_shape, mod.local_shape, mod.tp_dim, layout.expert, warm)
                    buckets[key].append((p, state, mod, layout))
            for (_, _, _, _, warm), entries in buckets.items():
                batches.append(self._step_bucket(entries, cfg, float(group["lr"]), warm, kinds))
        self._last = StepStats.from_batches(batches)
        self._kinds = kinds
        return loss

    def _step_bucket(self, entries: list, cfg: SphereConfig, lr: float, warm: bool, kinds) -> Any:
        p0, _, mod0, layout0 = entries[0]
        m, n = mod0.full_shape
        b = cache_block(cfg, mod0)

        def stacked(fn) -> Tensor:
            return torch.stack([fn(p, s, mod).float() for p, s, mod, _ in entries])

        W = self._gather(stacked(lambda p, s, mod: mod.view(p)), mod0, layout0)
        G = self._gather(stacked(lambda p, s, mod: mod.view(p.grad)), mod0, layout0)
        M = self._gather(stacked(lambda p, s, mod: mod.view(s["momentum_buffer"])), mod0, layout0)
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
                               full_shape=(m, n))
        for i, (p, s, mod, layout) in enumerate(entries):
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
        for i, (_, _, mod, _) in enumerate(entries):
            by_kind[mod.kind].append(i)
        for kind, idx in by_kind.items():
            sel = torch.tensor(idx, device=W.device)
            kinds[kind].append(torch.stack([err[sel].max(), rms[sel].sum(), torch.tensor(float(len(idx)))]))
        return stats

    # ------------------------------------------------------------------ stats
    @property
    def last_step_stats(self) -> dict[str, float]:
        """The last step's solver totals (see :class:`~megatron_sso.optim.step_stats.StepStats`)
        plus ``tp_gather_bytes`` since construction. Reading synchronises once."""
        out = self._last.as_dict() if self._last is not None else {}
        out["tp_gather_bytes"] = self.gather_bytes
        return out

    def kind_stats(self) -> dict[str, dict[str, float]]:
        """Per module kind (``qkv_q``, ``gate``, ``linear_proj``...): ``max_norm_error``
        (max ``|sigma/R - 1|`` of the weights the last forward pass used; 0 for Muon),
        ``update_rms`` (mean RMS of the applied change) and ``modules``."""
        out = {}
        for kind, rows in self._kinds.items():
            t = torch.stack(rows)
            count = float(t[:, 2].sum())
            out[kind] = {"max_norm_error": float(t[:, 0].max()),
                         "update_rms": float(t[:, 1].sum()) / max(count, 1.0), "modules": int(count)}
        return out
