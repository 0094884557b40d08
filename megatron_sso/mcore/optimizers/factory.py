"""``optimizer: sso | muon_sphere | sso_muon | muon_hyperball`` through Megatron's optimizer factory.

``muon`` is never ours: it stays Megatron's own Muon (``get_megatron_muon_optimizer``, with the
``muon_*`` settings), whatever ``install()`` is given; our Muon baseline is ``sso_muon``.

Two hooks, one dispatch rule (:func:`builder_for`): our names go to
:func:`get_sphere_megatron_optimizer` (``signum``, ``ademamix`` and ``adam`` with a SPECTRA clip on
go to :mod:`.spectra_factory`), all others to Megatron's own factory, unchanged.

* Megatron-Bridge >= 0.4 calls ``optimizer_config.provide(...)`` when the config has one:
  :class:`~.config.SSOOptimizerConfig` does, for our names (:func:`provide_for`), so Bridge needs
  no patching at all.
* Megatron-LM (every release) and Megatron-Bridge 0.3.1 import the factory name at import time
  (``from megatron.core.optimizer import get_megatron_optimizer``), so :func:`install` replaces the
  name at those call sites (:func:`megatron_sso.mcore.compat.factory_call_sites`); Bridge 0.3.1
  sends every name containing "muon" to ``get_megatron_muon_optimizer``, so that name is wrapped too.

megatron-core >= 0.18 also has a private registry for "emerging" optimizers
(``megatron/core/optimizer/emerging_optimizers.py``). We do not use it: it needs the
``emerging-optimizers`` package even for a plugin's entry, it runs its parameter predicates before
any hook could attach our layouts, and it rebuilds the fp32 main params without them; wrapping the
call sites works the same on every release and touches no private name (docs/megatron.md).

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
from ..compat import factory_call_sites

logger = logging.getLogger(__name__)



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


def builder_for(config: Any, names: tuple[str, ...] = SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS):
    """Our factory for ``config`` (:func:`get_sphere_megatron_optimizer` or SPECTRA's), or None
    when Megatron's own builds it: plain ``adam``, ``sgd`` and names not in ``names``. The one
    dispatch rule of the wrapped call sites and of ``SSOOptimizerConfig.provide``."""
    mode = getattr(config, "optimizer", None)
    if mode in names and mode in SPHERE_OPTIMIZERS:
        return get_sphere_megatron_optimizer
    if spectra_selected(config) and (mode == "adam" or mode in names):
        from .spectra_factory import get_spectra_megatron_optimizer  # loaded only when SPECTRA is asked for

        return get_spectra_megatron_optimizer
    return None


def provide_for(config: Any):
    """Megatron-Bridge >= 0.4's optimizer hook for ``config``: a callable ``provide(model_chunks,
    config_overrides, use_gloo_process_groups, pg_collection)`` that builds our optimizer, or None
    when ``config`` selects one of Megatron's own (Bridge then runs its own factory)."""
    build = builder_for(config)
    if build is None:
        return None

    def provide(model_chunks: Any, config_overrides: Optional[dict] = None, use_gloo_process_groups: bool = True,
                pg_collection: Any = None):
        chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
        return build(config, chunks, config_overrides=config_overrides,
                     use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection)

    return provide


def _wrap(original, names: tuple[str, ...]):
    if getattr(original, "_megatron_sso_wrapped", False):
        return original

    @functools.wraps(original)
    def factory(config, model_chunks, *args, **kwargs):
        build = builder_for(config, names)
        if build is None:
            return original(config, model_chunks, *args, **kwargs)
        kwargs.pop("layer_wise_distributed_optimizer", None)  # Bridge 0.3.1's muon call site
        return build(config, model_chunks, *args, **kwargs)

    factory._megatron_sso_wrapped = True
    factory._megatron_sso_original = original
    return factory


def install(names: tuple[str, ...] = SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS,
            sites: Optional[tuple[str, ...]] = None) -> list[str]:
    """Make Megatron's factory build our optimizers for ``names``; returns what was patched.

    Idempotent. Call it in every rank before training starts (for Bridge: before
    ``pretrain``; with Bridge >= 0.4 and an ``SSOOptimizerConfig`` it patches nothing of Bridge and
    is not needed). ``names`` may be a subset of ours (``muon`` is Megatron's own and never one of
    them; our Muon baseline is ``sso_muon``). ``adam`` with a
    SPECTRA clip on (:func:`~.spectra_settings.spectra_enabled`) always goes to
    :mod:`.spectra_factory`; plain ``adam`` always stays Megatron's.

    ``sites`` are the modules whose factory names are wrapped. By default every module of
    :func:`~megatron_sso.mcore.compat.factory_call_sites` that imports (one that raises ImportError
    is skipped, e.g. Bridge for a Megatron-LM user). Given explicitly, only those are imported and wrapped, and an import
    error propagates: the Megatron-LM launcher passes ``("megatron.training.training",)`` so
    that ``megatron.bridge`` is never imported into a Megatron-LM run.
    """
    ours = SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS
    unknown = set(names) - set(ours)
    if unknown:
        hint = " ('muon' is Megatron's own Muon; ours is 'sso_muon')" if "muon" in unknown else ""
        raise ValueError(f"cannot register optimizer name(s) {sorted(unknown)}; ours are {ours}{hint}")
    if isinstance(sites, str):
        raise ValueError(f"sites must be a tuple of module names, got the string {sites!r}")
    patched = []
    for modname in factory_call_sites() if sites is None else tuple(sites):
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
