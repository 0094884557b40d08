"""``SpectralSphere``: SSO, MuonSphere and Muon as a plain ``torch.optim.Optimizer``.

A thin class over :func:`megatron_sso.optim.sphere_update.sphere_update_`: it keeps per-parameter
state, groups same-shape matrices into one batched update, and exposes what the step measured
in :attr:`SpectralSphere.last_step_stats`. It works on any PyTorch model; Megatron is not needed.
Give it the 2-D hidden weights only; embeddings, the output layer and 1-D parameters belong
to AdamW (paper §6.1).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch

from ..ops.retraction import target_radius, update_scale
from .config import SphereConfig
from .direction_optimizer import run_closure
from .hyperball import HyperballBuffers, hyperball_update_
from .sphere_update import BatchStats, SphereBuffers, init_sphere_state, sphere_update_
from .step_stats import StepStats

Tensor = torch.Tensor

STATE_KEYS = ("momentum_buffer", "right_block", "lambda", "slope", "lambda_warm", "hyperball_radius")
"""Per-parameter state: the momentum (param shape, fp32), the cached block of right singular
vectors (``d_in x b``), the last lambda root and secant slope (0-d tensors), whether set, and
(``hyperball`` mode only) the Frobenius radius (0-d)."""


class SpectralSphere(torch.optim.Optimizer):
    """Spectral Sphere Optimizer and relatives for 2-D weights.

    Args:
        params: 2-D tensors or param groups (a group may override any keyword below).
        lr: learning rate (> 0); the step is ``lr * s * Phi`` with ``||Phi||_2 = 1``.
        mode: ``"sso"``, ``"muon_sphere"``, ``"muon"`` or ``"hyperball"`` (Muon-Hyperball:
            ``lr`` is then the angular step, :mod:`megatron_sso.optim.hyperball`).
        batched: run same-shape matrices of a group through one batched update.
        **config: any other :class:`~megatron_sso.optim.config.SphereConfig` field
            (``momentum``, ``nesterov``, ``radius_scaler``, ``msign_steps``, ``lambda_tol``,
            ``lambda_max_iter``, ``power_iters``, ``retract``, ``lambda_solver``, ...).
    """

    def __init__(self, params: Iterable[Any], lr: float = 5e-3, *, mode: str = "sso",
                 batched: bool = True, **config: Any) -> None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, got lr={lr!r}")
        unknown = set(config) - set(SphereConfig.field_names())
        if unknown:
            raise ValueError(f"unknown SpectralSphere option(s) {sorted(unknown)}; "
                             f"valid: {sorted(SphereConfig.field_names())}")
        cfg = SphereConfig(mode=mode, **config)
        defaults = {f: getattr(cfg, f) for f in SphereConfig.field_names()}
        defaults.update(lr=lr, batched=batched)
        super().__init__(params, defaults)
        self._last_stats: Optional[StepStats] = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        SphereConfig.from_mapping(group)  # validates the group's overrides
        if not (group["lr"] > 0):
            raise ValueError(f"learning rate must be positive, got lr={group['lr']!r}")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"SpectralSphere optimises 2-D matrices only; got a parameter of shape "
                    f"{tuple(p.shape)} (give 1-D and embedding parameters to AdamW)"
                )

    @property
    def last_step_stats(self) -> dict[str, float]:
        """What the last ``step()`` measured (reading it synchronises with the device once):
        ``msign_calls``, ``num_matrices``, ``msign_calls_per_matrix``, ``max_abs_h``,
        ``max_abs_lambda``, ``skipped_nonfinite``, ``lambda_fallbacks`` (matrices whose
        secant solve ended in the tangent-projection fallback), ``lambda_above_tol`` (matrices
        whose best evaluated ``|h|``, the ``max_abs_h`` figure, stayed above ``lambda_tol``; the
        applied direction's own ``h`` is 0 by construction and not reported)."""
        return self._last_stats.as_dict() if self._last_stats is not None else {}

    def _state_for(self, p: Tensor) -> dict[str, Any]:
        return init_sphere_state(self.state[p], tuple(p.shape), p.device)

    @staticmethod
    def _buckets(params: list[Tensor], batched: bool) -> list[list[Tensor]]:
        if not batched:
            return [[p] for p in params]
        by_key: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            by_key[(tuple(p.shape), p.device, p.dtype)].append(p)
        return list(by_key.values())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = run_closure(closure)
        batches: list[BatchStats] = []
        for group in self.param_groups:
            cfg = SphereConfig.from_mapping(group)
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in self._buckets(params, group["batched"]):
                batches.extend(self._step_bucket(bucket, cfg, group["lr"]))
        self._last_stats = StepStats.from_batches(batches)
        return loss

    def _step_bucket(self, bucket: list[Tensor], cfg: SphereConfig, lr: float) -> list[BatchStats]:
        states = [self._state_for(p) for p in bucket]
        d_out, d_in = bucket[0].shape
        if cfg.on_hyperball:
            return [self._step_hyperball(bucket, states, cfg, lr)]
        # One batched solve needs one warm/cold status (it fixes the evaluation count).
        if len({("right_block" in s, s["lambda_warm"]) for s in states}) > 1:
            return [st for p in bucket for st in self._step_bucket([p], cfg, lr)]
        single = len(bucket) == 1 and bucket[0].dtype == torch.float32
        W = bucket[0].unsqueeze(0) if single else torch.stack([p.float() for p in bucket])
        G = torch.stack([p.grad for p in bucket])
        bufs = SphereBuffers.from_states(states)
        stats = sphere_update_(W, G, bufs, cfg, lr,
                               target_radius(d_out, d_in, cfg.radius_mode, cfg.radius_scaler),
                               update_scale(d_out, d_in, cfg.scale_mode))
        if not single:
            for i, p in enumerate(bucket):
                p.copy_(W[i])
        bufs.store_(states)
        return [stats]

    @staticmethod
    def _step_hyperball(bucket: list[Tensor], states: list[dict], cfg: SphereConfig, lr: float) -> BatchStats:
        for p, s in zip(bucket, states):  # 0 until the module's first step sets c ||W_0||_F
            s.setdefault("hyperball_radius", torch.zeros((), dtype=torch.float32, device=p.device))
        W = torch.stack([p.float() for p in bucket])
        bufs = HyperballBuffers(momentum=torch.stack([s["momentum_buffer"] for s in states]),
                                radius=torch.stack([s["hyperball_radius"] for s in states]))
        stats = hyperball_update_(W, torch.stack([p.grad for p in bucket]), bufs, cfg, lr)
        for i, (p, s) in enumerate(zip(bucket, states)):
            p.copy_(W[i])
            s["momentum_buffer"].copy_(bufs.momentum[i])
            s["hyperball_radius"].copy_(bufs.radius[i])
        return stats

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then restore the saved state dtypes: torch casts floating state to each
        parameter's dtype, which would round fp32 momentum to bf16 for bf16 parameters."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
