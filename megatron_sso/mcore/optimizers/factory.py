"""``optimizer: sso | muon_sphere | muon`` through Megatron's optimizer factory.

megatron-core 0.16/0.17 has no optimizer registry and its callers bind the factory name at
import time (``from megatron.core.optimizer import get_megatron_optimizer``), so
:func:`install` replaces the name at the call sites: Megatron-Bridge's
``megatron.bridge.training.optim`` (which sends every name containing "muon" to
``get_megatron_muon_optimizer`` instead, so that name is wrapped too) and Megatron-LM's
``megatron.training.training``. Our names go to :func:`get_sphere_megatron_optimizer`
(``signum``, ``ademamix`` and ``adam`` with a SPECTRA clip on go to
:mod:`.spectra_factory`), all others fall through unchanged. On megatron-core >= 0.18 the
private registry in ``megatron/core/optimizer/emerging_optimizers.py`` is used for the sphere
names when present (see :mod:`.registry`).

Routing (paper §6.1, SPEC §3): every 2-D hidden weight goes to the sphere optimizer, split into
atomic modules (:mod:`.layouts`); word and position embeddings and the output layer (by name
and by Megatron's ``is_embedding_or_output_parameter``), every 1-D parameter and, unless
``sso_router_on_sphere``, the MoE router go to Megatron's own Adam(W) built by the stock
factory from the same config (its betas, eps, weight decay, scheduler). The sphere optimizer
is wrapped like Megatron wraps Adam (``FP32Optimizer``, or ``Float16OptimizerWithFloat16Params``
with fp32 main params and the grad scaler under bf16) and everything is chained in one
``ChainedOptimizer`` on the *same* config object, so Megatron's global grad-norm clipping and
NaN/Inf skip span all members, ranks and pipeline stages.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Optional

from .config import SPHERE_OPTIMIZERS, megatron_setting, sphere_config_from
from .spectra_settings import SPECTRA_OPTIMIZERS, spectra_selected
from .chain import build_chain, route  # noqa: F401  (route: the routing table, re-exported)
from .dp_shard import dp_groups_of
from .sphere_optimizer import MegatronSphere, check_cache_fits, init_sphere_state

logger = logging.getLogger(__name__)

CALL_SITES = ("megatron.bridge.training.optim", "megatron.training.training")
"""Modules that import the factory name directly (and so must have it replaced)."""

def _core_version() -> tuple[int, int]:
    from megatron.core import package_info

    major, minor = package_info.__version__.split(".")[:2]
    return int(major), int(minor)


def get_sphere_megatron_optimizer(config: Any, model_chunks: list, config_overrides: Optional[dict] = None,
                                  use_gloo_process_groups: bool = True, pg_collection: Any = None,
                                  **_ignored: Any):
    """Build ``ChainedOptimizer([sphere (dense), sphere (expert-parallel, if any), Megatron
    Adam members...])`` for ``config.optimizer`` in :data:`SPHERE_OPTIMIZERS`.

    Raises ValueError for the distributed optimizer (it cuts matrices into flat slices; the
    sphere optimizer shards by whole atomic modules instead, :mod:`.dp_shard`), for
    fp16 and CPU offload (not supported), or for a bad ``sso_*`` value.
    """
    mode = config.optimizer
    cfg = sphere_config_from(config)
    if config.use_distributed_optimizer:
        raise ValueError(
            f"optimizer={mode!r} with use_distributed_optimizer=True: Megatron's distributed optimizer "
            "cuts matrices into flat slices, but every atomic module must be updated whole. Set "
            "use_distributed_optimizer=False: the sphere optimizer shards its work across data-parallel "
            "ranks by whole atomic modules itself (sso_dp_shard, docs/megatron.md)."
        )
    if config.fp16:
        raise ValueError(f"optimizer={mode!r} with fp16=True is not supported; use bf16 or fp32")
    if getattr(config, "optimizer_cpu_offload", False):
        raise ValueError(f"optimizer={mode!r} with optimizer_cpu_offload=True is not supported")
    router = megatron_setting(config, "sso_router_on_sphere")
    megatron_setting(config, "sso_tp_mode")

    def mup_init(matrices, tp_groups):
        if megatron_setting(config, "sso_mup_init") and cfg.on_sphere:
            from .mup_init import spectral_mup_init_modules_

            spectral_mup_init_modules_(matrices, cfg, tp_groups)

    def make_inner(param_groups, tp_groups, pgs):
        return MegatronSphere(param_groups, cfg, tp_groups, dp_groups_of(pgs),  # see .dp_shard
                              dp_shard=megatron_setting(config, "sso_dp_shard"))

    chain = build_chain(config, model_chunks, router_on_sphere=router,
                        split_qkv=megatron_setting(config, "sso_split_qkv"),
                        split_glu=megatron_setting(config, "sso_split_glu"),
                        make_inner=make_inner, init_state_fn=init_sphere_state,
                        check_layout=lambda layout: check_cache_fits(cfg, layout),
                        before_grouping=mup_init, config_overrides=config_overrides,
                        use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection)
    logger.info("megatron_sso: %s on %d parameters (%d atomic modules), Adam on %d parameters",
                mode, len(chain.matrices), chain.modules, len(chain.others))
    return chain.optimizer


def _wrap(original, names: tuple[str, ...]):
    if getattr(original, "_megatron_sso_wrapped", False):
        return original

    @functools.wraps(original)
    def factory(config, model_chunks, *args, **kwargs):
        mode = getattr(config, "optimizer", None)
        if mode in names and mode in SPHERE_OPTIMIZERS:
            kwargs.pop("layer_wise_distributed_optimizer", None)  # Bridge's muon call site
            return get_sphere_megatron_optimizer(config, model_chunks, *args, **kwargs)
        if spectra_selected(config) and (mode == "adam" or mode in names):
            from .spectra_factory import get_spectra_megatron_optimizer  # loaded only when SPECTRA is asked for

            kwargs.pop("layer_wise_distributed_optimizer", None)
            return get_spectra_megatron_optimizer(config, model_chunks, *args, **kwargs)
        return original(config, model_chunks, *args, **kwargs)

    factory._megatron_sso_wrapped = True
    factory._megatron_sso_original = original
    return factory


def install(names: tuple[str, ...] = SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS,
            sites: Optional[tuple[str, ...]] = None) -> list[str]:
    """Make Megatron's factory build our optimizers for ``names``; returns what was patched.

    Idempotent. Call it in every rank before training starts (for Bridge: before
    ``pretrain``). ``names`` may drop ``"muon"`` to keep Megatron's own Muon. ``adam`` with a
    SPECTRA clip on (:func:`~.spectra_settings.spectra_enabled`) always goes to
    :mod:`.spectra_factory`; plain ``adam`` always stays Megatron's.

    ``sites`` are the modules whose factory names are wrapped. By default every module of
    :data:`CALL_SITES` that imports (one that raises ImportError is skipped, e.g. Bridge for a
    Megatron-LM user). Given explicitly, only those are imported and wrapped, and an import
    error propagates: the Megatron-LM launcher passes ``("megatron.training.training",)`` so
    that ``megatron.bridge`` is never imported into a Megatron-LM run.
    """
    ours = SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS
    unknown = set(names) - set(ours)
    if unknown:
        raise ValueError(f"cannot register optimizer name(s) {sorted(unknown)}; ours are {ours}")
    if isinstance(sites, str):
        raise ValueError(f"sites must be a tuple of module names, got the string {sites!r}")
    patched = []
    if _core_version() >= (0, 18):
        from .registry import register_emerging

        if register_emerging(tuple(n for n in names if n in SPHERE_OPTIMIZERS)):
            patched.append("megatron.core.optimizer.emerging_optimizers")
            names = tuple(n for n in names if n not in SPHERE_OPTIMIZERS)  # SPECTRA: call sites below
    for modname in CALL_SITES if sites is None else tuple(sites):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            if sites is not None:
                raise
            continue
        for attr in ("get_megatron_optimizer", "get_megatron_muon_optimizer"):
            if hasattr(mod, attr):
                setattr(mod, attr, _wrap(getattr(mod, attr), tuple(names)))
                patched.append(f"{modname}.{attr}")
    return patched
