"""Optional spectral-muP initialisation of every atomic module (``sso_mup_init``, default off).

``W <- R * W / ||W||_2`` per atomic module (paper §4), so training starts on the sphere. It runs
once, when the optimizer is built and before Megatron's fp16/bf16 wrapper copies the weights into
fp32 main params, on the model parameters themselves (written back into each module's view).
A TP-sharded module is gathered first: the norm is that of the whole matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ops.retraction import spectral_mup_init_, target_radius
from ...optim.config import SphereConfig
from .sphere_optimizer import LAYOUT_ATTR, MegatronSphere


@torch.no_grad()
def spectral_mup_init_modules_(params: list, cfg: SphereConfig, tp_groups: dict[str, Any]) -> None:
    """Rescale every atomic module of ``params`` (which carry their layouts) to its radius."""
    helper = MegatronSphere([{"params": [torch.zeros(1, 1)]}], cfg, tp_groups)  # for its TP gather
    for p in params:
        layout = getattr(p, LAYOUT_ATTR)
        for mod in layout.modules:
            view = mod.view(p.data)
            full = helper._gather(view.float().unsqueeze(0), mod, layout)[0]
            spectral_mup_init_(full, target_radius(*mod.full_shape, cfg.radius_mode, cfg.radius_scaler))
            view.copy_(helper._keep_own(full, mod, layout))
