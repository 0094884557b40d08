"""``optimizer: adam | signum | ademamix`` with SPECTRA clipping, through Megatron's factory.

:func:`.factory.install` sends ``optimizer`` values ``signum`` and ``ademamix`` here always, and
``adam`` only when a SPECTRA clip is on (``spectra_post_clip`` or ``spectra_pre_clip`` set and
nonzero, :func:`~.config.spectra_enabled`); plain ``adam`` falls through to Megatron untouched.

Routing is SSO's (:func:`.chain.route`, SPEC §3): every 2-D hidden weight goes to
:class:`~.spectra_optimizer.MegatronSpectra` (the base optimiser plus the clip per atomic
module, :mod:`.layouts`); word and position embeddings, the output layer, every 1-D parameter
and the MoE router go to Megatron's own Adam(W), built by the pristine stock factory from the
same config (its betas, eps, weight decay, scheduler). The SPECTRA members are wrapped as
Megatron wraps Adam (``FP32Optimizer``, or ``Float16OptimizerWithFloat16Params`` with fp32 main
params under bf16) and everything is chained in one ``ChainedOptimizer`` on the *same* config
object, so global grad-norm clipping and the NaN/Inf skip span all members.

Where pre-clipping happens. ``ChainedOptimizer.step`` (megatron-core 0.16.1,
``megatron/core/optimizer/optimizer.py``) runs ``prepare_grads()`` on every member -- copy of
the DDP ``main_grad`` into ``param.grad`` (fp32 main grads under bf16), unscaling and the inf
check --, then ``get_grad_norm()`` and ``clip_grad_by_total_norm_fp32`` over all members, then
``step_with_ready_grads()``. So ``prepare_grads`` is the last point where the gradients the
optimizer will use are final (data-parallel reduced, unscaled) but not yet norm-clipped; our
wrapper subclasses override it and pre-clip there (skipped when an inf/NaN was found: the step
is skipped anyway). The global norm is then the norm of the pre-clipped gradients, as SPECTRA
prescribes. A single wrapped optimizer's own ``step()`` (FP32Optimizer/MixedPrecisionOptimizer)
calls ``prepare_grads`` before ``clip_grad_norm`` too.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

from .spectra_settings import SPECTRA_REFUSED, spectra_configs_from, spectra_setting
from .chain import build_chain
from .spectra_optimizer import MegatronSpectra, init_spectra_state

logger = logging.getLogger(__name__)

@functools.lru_cache(maxsize=None)
def _wrapper_classes():
    """FP32 / Float16 Megatron wrappers whose ``prepare_grads`` pre-clips (module docstring)."""
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    class PreClip:
        def prepare_grads(self) -> bool:
            found_inf = super().prepare_grads()
            if not found_inf and not self.is_stub_optimizer:
                self.optimizer.pre_clip_gradients_()
            return found_inf

    class SpectraFP32Optimizer(PreClip, FP32Optimizer):
        """Megatron's FP32Optimizer, pre-clipping in ``prepare_grads`` (before norm clipping)."""

    class SpectraFloat16Optimizer(PreClip, Float16OptimizerWithFloat16Params):
        """Megatron's Float16OptimizerWithFloat16Params, pre-clipping the fp32 main grads in
        ``prepare_grads`` (after unscaling and the inf check, before norm clipping)."""

    return SpectraFP32Optimizer, SpectraFloat16Optimizer


def get_spectra_megatron_optimizer(config: Any, model_chunks: list, config_overrides: Optional[dict] = None,
                                   use_gloo_process_groups: bool = True, pg_collection: Any = None,
                                   **_ignored: Any):
    """Build ``ChainedOptimizer([SPECTRA (dense), SPECTRA (expert-parallel, if any), Megatron
    Adam members...])`` for ``config.optimizer`` in ``adam`` (with a clip on), ``signum``,
    ``ademamix``.

    Raises ValueError for the distributed optimizer (it cuts matrices into flat slices; the
    clip needs whole atomic modules), fp16, CPU offload, the precision-aware optimizer,
    ``decoupled_weight_decay=False`` (SPECTRA's decay is decoupled) or a bad ``spectra_*`` value.
    """
    mode = config.optimizer
    cfg, base_cfg = spectra_configs_from(config)
    for flag, why in SPECTRA_REFUSED:
        if getattr(config, flag, False):
            raise ValueError(f"optimizer={mode!r} with SPECTRA and {flag}=True: {why}")
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError(f"optimizer={mode!r} with SPECTRA needs decoupled_weight_decay=True "
                         "(the clipped step applies W <- (1 - lr wd) W)")
    fp32_cls, fp16_cls = _wrapper_classes()
    chain = build_chain(config, model_chunks, router_on_sphere=False,
                        split_qkv=spectra_setting(config, "spectra_split_qkv"),
                        split_glu=spectra_setting(config, "spectra_split_glu"),
                        make_inner=lambda groups, tp_groups, _: MegatronSpectra(groups, cfg, base_cfg, tp_groups),
                        init_state_fn=init_spectra_state, wrapper_classes=(fp32_cls, fp16_cls),
                        config_overrides=config_overrides, use_gloo_process_groups=use_gloo_process_groups,
                        pg_collection=pg_collection)
    logger.info("megatron_sso: %s with SPECTRA (clip %s c=%s, pre-clip %s) on %d parameters (%d atomic modules), "
                "Adam on %d parameters", mode, cfg.clip, cfg.c, cfg.pre_clip_c if cfg.pre_clip else "off",
                len(chain.matrices), chain.modules, len(chain.others))
    return chain.optimizer


__all__ = ["get_spectra_megatron_optimizer"]
