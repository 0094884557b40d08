"""What the SPECTRA optimizers measured, for Megatron's logger and TensorBoard, plus a test probe.

Keys (``spectra/`` prefix), from :attr:`~.spectra_optimizer.MegatronSpectra.last_step_stats`:
``num_matrices``, ``num_unclipped``, ``pre_clipped``, ``num_clipped``, ``max_sigma_pre``,
``mean_sigma_pre``, ``max_sigma_post``, ``tp_gather_bytes`` and, per module kind,
``<kind>/max_sigma_pre`` and ``<kind>/max_sigma_post``. ``sigma_pre`` is a power-iteration
estimate of ``||D||_2`` of the base direction, ``sigma_post`` the spectral norm ``s f(sigma_pre)``
of the clipped update per unit lr. Statistics stay on the device until read, once per log interval.

Bridge: pass :func:`spectra_logging_callback` in ``pretrain(..., callbacks=[...])``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...ops.spectral_clip import spectra_update_scale
from .sphere_logging import inner_optimizers, interval_logging_callback
from ..optimizers import LAYOUT_ATTR
from ..optimizers import MegatronSpectra


def spectra_optimizers(optimizer: Any) -> list[MegatronSpectra]:
    """The :class:`MegatronSpectra` instances inside a (chained, wrapped) Megatron optimizer."""
    return inner_optimizers(optimizer, MegatronSpectra)


def spectra_stats(optimizer: Any) -> dict[str, float]:
    """Flat ``{"spectra/...": value}`` over every SPECTRA member (empty without one)."""
    out: dict[str, float] = {}
    weighted = 0.0
    for opt in spectra_optimizers(optimizer):
        stats = opt.last_step_stats
        for key, value in stats.items():
            if key == "mean_sigma_pre":
                weighted += value * stats["num_matrices"]
                continue
            name = f"spectra/{key}"
            combine = max if key.startswith("max_") else (lambda a, b: a + b)
            out[name] = combine(out[name], value) if name in out else value
        for kind, vals in opt.kind_stats().items():
            for key in ("max_sigma_pre", "max_sigma_post"):
                name = f"spectra/{kind}/{key}"
                out[name] = max(out.get(name, 0.0), vals[key])
    if out.get("spectra/num_matrices") and "spectra/max_sigma_pre" in out:
        out["spectra/mean_sigma_pre"] = weighted / out["spectra/num_matrices"]
    return out


def spectra_logging_callback():
    """The Bridge callback logging :func:`spectra_stats` every ``logger.log_interval`` iterations
    (TensorBoard and the Python log; ``user_state["spectra_stats"]``)."""
    return interval_logging_callback(spectra_stats, "spectra", "spectra_stats")


# ---------------------------------------------------------------------------- test probe

_PREVIOUS: dict[int, torch.Tensor] = {}


def _full(t: torch.Tensor, mod, layout, opt: MegatronSpectra) -> torch.Tensor:
    if mod.tp_dim is None:
        return t
    group = opt._group_of(layout)
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return torch.cat(pieces, dim=mod.tp_dim)


@torch.no_grad()
def update_probe(context) -> dict:
    """A :func:`~.bridge_runner.run_pretrain` probe (every rank calls it after every step).

    Measures, by exact SVD and independently of the optimizer's own statistics:

    * ``update_ratio`` per module kind: ``max ||(W_t - (1 - lr wd) W_{t-1}) / lr||_2 / (c s)``
      over the atomic modules (the applied clipped update per unit lr against its bound; from
      the second step on, using the weights this probe kept and the lr/wd the step used);
    * ``grad_ratio`` per kind (pre-clip on): ``max ||G||_2 / c_pre`` of the gradients the step
      used (after Megatron's global-norm clipping, which only shrinks them);
    * ``grad_norm_now``: Megatron's global norm of those gradients, to compare with the norm
      it reported (``min(norm, clip_grad)`` iff pre-clipping ran before the norm clipping).
    """
    out: dict[str, Any] = {"stats": spectra_stats(context.optimizer), "update_ratio": {}, "grad_ratio": {}}
    for opt in spectra_optimizers(context.optimizer):
        cfg = opt.cfg
        for (lr, wd), group in zip(opt.last_lr_wd, opt.param_groups):
            for p in group["params"]:
                layout = getattr(p, LAYOUT_ATTR)
                previous = _PREVIOUS.get(id(p))
                delta = None if previous is None or cfg.clip == "none" else (p.detach() - (1 - lr * wd) * previous) / lr
                for mod in layout.modules:
                    s = spectra_update_scale(*mod.full_shape) if cfg.shape_scale else 1.0
                    if delta is not None:
                        sigma = torch.linalg.matrix_norm(_full(mod.view(delta), mod, layout, opt).double(), ord=2)
                        ratio = float(sigma) / (cfg.c * s)
                        out["update_ratio"][mod.kind] = max(out["update_ratio"].get(mod.kind, 0.0), ratio)
                    if cfg.pre_clip and p.grad is not None:
                        sigma = torch.linalg.matrix_norm(_full(mod.view(p.grad), mod, layout, opt).double(), ord=2)
                        ratio = float(sigma) / cfg.pre_clip_c
                        out["grad_ratio"][mod.kind] = max(out["grad_ratio"].get(mod.kind, 0.0), ratio)
                _PREVIOUS[id(p)] = p.detach().clone()
    out["grad_norm_now"] = float(context.optimizer.get_grad_norm())
    return out
