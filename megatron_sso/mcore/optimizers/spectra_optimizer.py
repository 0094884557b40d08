"""The torch optimizer that Megatron's wrappers hold for SPECTRA's 2-D hidden weights.

SPECTRA (SPEC §5, :mod:`megatron_sso.optim.spectra`) keeps a base optimiser (AdamW, Signum or
AdEMAMix) and replaces each hidden matrix's update by a spectrally clipped one. Under Megatron
the "matrix" is an *atomic module* (:mod:`.layouts`): each Q head, K group and V group of a
fused QKV, the gate and up halves of a SwiGLU fc1, each expert; proj and fc2 stay whole. One
step of a param group (``lr`` and ``weight_decay`` as Megatron's scheduler left them) is

    D = base direction of the whole parameter (elementwise, per unit lr, no decay),
    W <- (1 - lr wd) W,   then for every module M:   W[M] <- W[M] - lr s_M H_c(D[M]),

with ``s_M = sqrt(max(1, d_out/d_in))`` of the module's *full* shape. The base directions are
elementwise, so computing ``D`` on the whole parameter and slicing it is the same as running
the base optimiser per module; same-shape modules of a group are clipped as one batch.

**State is checkpointable as is**: exactly the base optimiser's own per-parameter state
(AdamW ``exp_avg``, ``exp_avg_sq``; Signum ``momentum_buffer``; AdEMAMix ``exp_avg_fast``,
``exp_avg_slow``, ``exp_avg_sq``), every tensor of the parameter's shape, and a common integer
``step`` -- what Megatron's torch_dist sharded state dict expects (MEGATRON_FACTS).

**Tensor parallelism.** A module whose ``tp_dim`` is set (row-parallel proj and fc2, the halves
of a column-parallel fc1, TP-split experts) is a shard. The soft clip runs on the shard with
*one all-reduce of the small Gram matrix* per batch (:func:`~megatron_sso.ops.soft_spectral_clip`
with ``partition_dim``), so no weight moves; the hard clip needs an SVD of the whole matrix,
so its shards are all-gathered, clipped identically on every rank, and each keeps its slice
(bytes counted in ``tp_gather_bytes``). Per-head QKV modules are whole on their rank.

**Pre-clipping** (:meth:`MegatronSpectra.pre_clip_gradients_`) soft-clips each module's raw
gradient the same way; the Megatron wrapper (:mod:`.spectra_factory`) calls it in
``prepare_grads``, before the global-norm clipping.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ...ops.power_iteration import default_start_vector, power_iteration
from ...ops.spectral_clip import soft_spectral_clip, spectra_update_scale
from ...optim.direction_optimizer import run_closure
from ...optim.index_cache import IndexCache
from ...optim.spectra import BASE_OPTIMIZERS, SpectraConfig, spectra_clip_update
from .layouts import AtomicModule, ParamLayout
from .sphere_optimizer import LAYOUT_ATTR, init_sphere_state
from .tp_modules import ModuleGatherMixin

Tensor = torch.Tensor


init_spectra_state = init_sphere_state
"""Megatron's ``init_state_fn`` (zeros for every state tensor before a load): the same contract
as the sphere optimizer's, through :meth:`MegatronSpectra._state_for`."""


class MegatronSpectra(ModuleGatherMixin, torch.optim.Optimizer):
    """A base optimiser with SPECTRA clipping over the atomic modules of Megatron parameters.

    Args:
        param_groups: Megatron param groups (``_get_param_groups``); the scheduler rewrites
            ``lr`` and ``weight_decay`` in them every step. Every parameter carries its layout
            in the :data:`~.sphere_optimizer.LAYOUT_ATTR` attribute.
        cfg: SPECTRA settings (``base``, ``clip`` -- ``"none"`` runs the plain base optimiser --,
            ``c``, ``pre_clip``...).
        base_cfg: the base optimiser's config (:class:`~megatron_sso.optim.AdamWConfig`, ...);
            its ``weight_decay`` is replaced by each group's scheduled value.
        tp_groups: ``{"dense": group, "expert": group}`` TP process groups (``None``: size 1).
    """

    def __init__(self, param_groups: list[dict], cfg: SpectraConfig, base_cfg: Any,
                 tp_groups: Optional[dict[str, Any]] = None) -> None:
        super().__init__(param_groups, {"lr": 1e-3, "weight_decay": 0.0})
        self.cfg = cfg
        self.base_cfg = base_cfg
        self.rule = BASE_OPTIMIZERS[cfg.base]
        self.tp_groups = tp_groups or {}
        self.gather_bytes = 0
        self.last_lr_wd: list[tuple[float, float]] = []
        """``(lr, weight_decay)`` each group used in the last step (the scheduler has moved on
        by the time a callback runs)."""
        self._rows: dict[str, list[Tensor]] = {}
        self._counts: dict[str, int] = {}
        self._index = IndexCache()  # the step's index lists, made on their device once

    # ------------------------------------------------------------------ state
    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update(self.rule.init_state(p))
        return state

    # ------------------------------------------------------------------ TP
    def _allreduce(self, layout: ParamLayout) -> Callable[[Tensor], Tensor]:
        group = self._group_of(layout)

        def reduce(t: Tensor) -> Tensor:
            dist.all_reduce(t, group=group)
            return t

        return reduce

    def _clip(self, X: Tensor, mod: AtomicModule, layout: ParamLayout) -> Tensor:
        """``s H_c(X)`` for a batch of module updates (shards under TP)."""
        if mod.tp_dim is None:
            return spectra_clip_update(X, self.cfg)
        if self.cfg.clip == "soft":
            return spectra_clip_update(X, self.cfg, shape=mod.full_shape, allreduce=self._allreduce(layout),
                                       partition_dim=mod.tp_dim)
        full = self._gather(X, mod, layout)
        return self._keep_own(spectra_clip_update(full, self.cfg), mod, layout, dim_offset=1)

    def _sigma(self, X: Tensor, mod: AtomicModule, layout: ParamLayout) -> Tensor:
        """Power-iteration estimate of ``||X||_2`` per batch entry (a lower bound)."""
        iters = self.cfg.stats_power_iters
        if mod.tp_dim is None:
            return power_iteration(X, iters=iters)[0]
        v0 = None
        if mod.tp_dim == 1:  # the right vector is split like the columns
            n = X.size(-1)
            rank = dist.get_rank(self._group_of(layout))
            v0 = default_start_vector(n, offset=rank * n, total=mod.full_shape[1], device=X.device)
            v0 = v0.expand(X.shape[:-2] + (n,))
        return power_iteration(X, v0, iters=iters, allreduce=self._allreduce(layout), partition_dim=mod.tp_dim)[0]

    # ------------------------------------------------------------------ buckets
    def _buckets(self, params) -> dict[tuple, list]:
        """Same-shape modules of ``params`` (with a gradient), in a fixed order on every rank."""
        buckets: dict[tuple, list] = defaultdict(list)
        for p in params:
            if p.grad is None:
                continue
            layout: ParamLayout = getattr(p, LAYOUT_ATTR)
            for mod in layout.modules:
                buckets[(mod.full_shape, mod.local_shape, mod.tp_dim, layout.expert)].append((p, mod, layout))
        return buckets

    # ------------------------------------------------------------------ pre-clip
    @torch.no_grad()
    def pre_clip_gradients_(self) -> int:
        """Soft-clip, in place, every atomic module of every gradient at ``cfg.pre_clip_c``
        (SPECTRA pre-clipping; a no-op unless ``cfg.pre_clip``). Call after the data-parallel
        reduction and before global-norm clipping. Returns the number of modules clipped."""
        cfg = self.cfg
        if not cfg.pre_clip:
            return 0
        count = 0
        for group in self.param_groups:
            for entries in self._buckets(group["params"]).values():
                _, mod0, layout0 = entries[0]
                X = torch.stack([mod.view(p.grad) for p, mod, _ in entries])
                tp = mod0.tp_dim is not None
                H = soft_spectral_clip(X, cfg.pre_clip_c, steps=cfg.clip_steps, compute_dtype=cfg.clip_torch_dtype,
                                       allreduce=self._allreduce(layout0) if tp else None,
                                       partition_dim=mod0.tp_dim if tp else None)
                for i, (p, mod, _) in enumerate(entries):
                    mod.view(p.grad).copy_(H[i])
                count += len(entries)
        self._counts["pre_clipped"] = count
        return count

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        cfg = self.cfg
        self._rows = defaultdict(list)
        self._counts = {"pre_clipped": self._counts.get("pre_clipped", 0), "num_matrices": 0, "num_unclipped": 0,
                        "tp_sharded": 0}
        self.last_lr_wd = []
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
            self.last_lr_wd.append((lr, wd))
            base_cfg = dataclasses.replace(self.base_cfg, weight_decay=wd)
            directions: dict[int, Tensor] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SPECTRA does not support sparse gradients")
                D = self.rule.direction_(p.grad, self._state_for(p), base_cfg)
                if wd:
                    p.mul_(1.0 - lr * wd)
                if cfg.clip == "none":
                    p.add_(D, alpha=-lr)
                    self._counts["num_unclipped"] += 1
                else:
                    directions[id(p)] = D
            if cfg.clip == "none":
                continue
            for entries in self._buckets(group["params"]).values():
                _, mod0, layout0 = entries[0]
                X = torch.stack([mod.view(directions[id(p)]) for p, mod, _ in entries])
                self._record(X, entries)
                H = self._clip(X, mod0, layout0)
                for i, (p, mod, _) in enumerate(entries):
                    mod.view(p).add_(H[i], alpha=-lr)
        return loss

    def _record(self, X: Tensor, entries: list) -> None:
        mod0, layout0 = entries[0][1], entries[0][2]
        self._counts["num_matrices"] += X.size(0)
        self._counts["tp_sharded"] += X.size(0) if mod0.tp_dim is not None else 0
        cfg = self.cfg
        if cfg.stats_power_iters == 0:
            return
        sigma = self._sigma(X, mod0, layout0).float()
        post = sigma / torch.sqrt(1.0 + (sigma / cfg.c) ** 2) if cfg.clip == "soft" else sigma.clamp_max(cfg.c)
        if cfg.shape_scale:
            post = post * spectra_update_scale(*mod0.full_shape)
        by_kind: dict[str, list[int]] = defaultdict(list)
        for i, (_, mod, _) in enumerate(entries):
            by_kind[mod.kind].append(i)
        for kind, idx in by_kind.items():
            sel = self._index(idx, X.device)
            s, q = sigma[sel], post[sel]
            count = torch.full((), float(len(idx)), device=X.device)  # a fill, not a host copy
            self._rows[kind].append(torch.stack([s.max(), q.max(), (s > cfg.c).float().sum(), s.sum(), count]))

    # ------------------------------------------------------------------ stats
    @property
    def last_step_stats(self) -> dict[str, float]:
        """The last step's totals: ``num_matrices`` (modules clipped), ``tp_sharded`` (those of
        them clipped as TP shards), ``num_unclipped`` (parameters stepped without a clip),
        ``pre_clipped`` (modules pre-clipped), and with
        ``stats_power_iters > 0``: ``num_clipped`` (estimated ``||D||_2 > c``),
        ``mean_sigma_pre`` / ``max_sigma_pre`` (estimated ``||D||_2``), ``max_sigma_post``
        (``s f(sigma_pre)``); ``tp_gather_bytes`` since construction. Reading synchronises once."""
        out: dict[str, float] = dict(self._counts)
        kinds = self.kind_stats()
        if kinds:
            count = sum(k["modules"] for k in kinds.values())
            out.update(num_clipped=sum(k["num_clipped"] for k in kinds.values()),
                       max_sigma_pre=max(k["max_sigma_pre"] for k in kinds.values()),
                       max_sigma_post=max(k["max_sigma_post"] for k in kinds.values()),
                       mean_sigma_pre=sum(k["mean_sigma_pre"] * k["modules"] for k in kinds.values()) / count)
        out["tp_gather_bytes"] = self.gather_bytes
        return out

    def kind_stats(self) -> dict[str, dict[str, float]]:
        """Per module kind (``qkv_q``, ``gate``, ``linear_proj``...): ``max_sigma_pre``,
        ``mean_sigma_pre``, ``max_sigma_post``, ``num_clipped`` and ``modules``."""
        out = {}
        for kind, rows in self._rows.items():
            t = torch.stack(rows)
            vals = torch.stack([t[:, 0].max(), t[:, 1].max(), t[:, 2].sum(), t[:, 3].sum(), t[:, 4].sum()]).tolist()
            out[kind] = {"max_sigma_pre": vals[0], "max_sigma_post": vals[1], "num_clipped": int(vals[2]),
                         "mean_sigma_pre": vals[3] / max(vals[4], 1.0), "modules": int(vals[4])}
        return out
