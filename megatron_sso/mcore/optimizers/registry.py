"""megatron-core >= 0.18: register our optimizers in its emerging-optimizer registry.

UNTESTED here: Python 3.11 tops out at megatron-core 0.16.1 (MEGATRON_FACTS). Written against
the registry as published in ``megatron/core/optimizer/emerging_optimizers.py`` on Megatron-LM
main (a private ``_EMERGING_OPTIMIZERS`` dict of ``EmergingOptimizerEntry(optimizer_cls,
init_state_fn, config_to_kwargs, default_param_overrides)``). Whatever differs from that
shape makes :func:`register_emerging` return False, and :func:`.factory.install` falls back to
wrapping the factory's call sites, which does not depend on the registry at all.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)


def register_emerging(names: tuple[str, ...]) -> bool:
    """Add one registry entry per name; False if the registry is absent or unexpected."""
    try:
        eo = importlib.import_module("megatron.core.optimizer.emerging_optimizers")
        registry = eo._EMERGING_OPTIMIZERS
        Entry = eo.EmergingOptimizerEntry
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
    except (ImportError, AttributeError) as exc:
        logger.info("megatron_sso: no emerging-optimizer registry (%s); wrapping call sites", exc)
        return False
    from .config import megatron_setting, sphere_config_from
    from .dp_shard import dp_groups_of
    from .chain import assign_layouts
    from .sphere_optimizer import LAYOUT_ATTR, MegatronSphere, check_cache_fits, init_sphere_state

    def to_adam(param) -> bool:
        # Layouts are attached by config_to_kwargs; a parameter without one goes to Adam.
        return not hasattr(param, LAYOUT_ATTR)

    def config_to_kwargs(config: Any, model_chunks: list, pg_collection: Any) -> dict:
        cfg = sphere_config_from(config)
        router = megatron_setting(config, "sso_router_on_sphere")
        tp_groups = {"dense": pg_collection.tp, "expert": getattr(pg_collection, "expt_tp", None)}
        assign_layouts(model_chunks, tp_groups, router, megatron_setting(config, "sso_split_qkv"),
                       megatron_setting(config, "sso_split_glu"), lambda layout: check_cache_fits(cfg, layout))
        return {"cfg": cfg, "tp_groups": tp_groups, "dp_groups": dp_groups_of(pg_collection),
                "dp_shard": megatron_setting(config, "sso_dp_shard")}

    overrides = {ParamKey(predicate=ParamPredicate(name="megatron_sso_adam", fn=to_adam)): {"optimizer": "adam"}}
    for name in names:
        registry[name] = Entry(optimizer_cls=MegatronSphere, init_state_fn=init_sphere_state,
                               config_to_kwargs=config_to_kwargs, default_param_overrides=overrides)
    return True
