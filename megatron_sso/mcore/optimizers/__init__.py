"""Our optimizers inside Megatron's optimizer factory (start here to read the integration).

``install()`` (:mod:`.factory`) wraps Megatron's factory at its call sites so that ``optimizer:
sso | muon_sphere | muon | muon_hyperball`` and SPECTRA's ``adam | signum | ademamix`` build a ``ChainedOptimizer``
(:mod:`.chain`: routing, Megatron's wrappers, Adam for the rest) around :class:`MegatronSphere` /
:class:`MegatronSpectra`, which update each atomic module (:mod:`.layouts`: Q head, K/V group,
gate/up, expert) with TP gathers (:mod:`.tp_modules`) and DP sharding (:mod:`.dp_shard`). Settings
live on the ``OptimizerConfig`` (:mod:`.config`: ``sso_*``; :mod:`.spectra_settings`: ``spectra_*``).
Callers: the CLI, the Bridge runner, the Megatron-LM hooks, observation. The names below are the
room's face; the rest is internal.
"""

from .. import lazy_face

FACE = {
    "factory": ("install", "get_sphere_megatron_optimizer", "builder_for", "provide_for"),
    "unsupported": ("REFUSALS", "find_refusal"),
    "spectra_factory": ("get_spectra_megatron_optimizer",),
    "config": ("SSOOptimizerConfig", "SPHERE_OPTIMIZERS", "SPHERE_MODES", "MEGATRON_SETTINGS", "sphere_config_from",
               "megatron_setting"),
    "spectra_settings": ("SPECTRA_OPTIMIZERS", "SPECTRA_SETTINGS", "SPECTRA_REFUSED", "check_spectra",
                         "spectra_configs_from", "spectra_enabled", "spectra_selected"),
    "layouts": ("AtomicModule", "ParamLayout", "param_layout"),
    "sphere_optimizer": ("LAYOUT_ATTR", "MegatronSphere"),
    "spectra_optimizer": ("MegatronSpectra",),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
