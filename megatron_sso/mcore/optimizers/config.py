"""Where the sphere optimizers' settings live in a Megatron ``OptimizerConfig``.

Megatron's factory receives one ``OptimizerConfig`` object and ``ChainedOptimizer`` asserts
that every member optimizer holds an *equal* config, so the SSO settings must travel inside
that same object. We subclass the config class (Bridge's deferred-post-init
``OptimizerConfig`` when Megatron-Bridge is importable, else megatron-core's) and add one
``sso_<field>`` attribute per :class:`~megatron_sso.optim.config.SphereConfig` field plus a
few Megatron-side settings, and the ``spectra_*`` settings of :data:`.spectra_settings.SPECTRA_SETTINGS`
(``optimizer: adam | signum | ademamix`` with SPECTRA clipping). Because the subclass is a
real dataclass, Bridge's YAML merge and Hydra overrides see the fields:
``optimizer.sso_lambda_tol=1e-4`` or ``optimizer.spectra_post_clip=5`` work, and a YAML may name
the class with ``_target_: megatron_sso.mcore.optimizers.config.SSOOptimizerConfig``.

A plain ``OptimizerConfig`` works too where the factory's call sites are wrapped (Megatron-LM,
Bridge 0.3.1: :func:`.factory.install`): missing ``sso_*`` attributes take the defaults
(Megatron-LM's argument hook sets them as attributes on the stock object). Bridge >= 0.4 needs
this class: it builds our optimizers through its ``provide`` attribute (:func:`_provide`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ...optim.config import SphereConfig
from .spectra_settings import SPECTRA_SETTINGS

SPHERE_MODES = {"sso": "sso", "muon_sphere": "muon_sphere", "sso_muon": "muon", "muon_hyperball": "hyperball"}
"""``optimizer`` value -> :class:`~megatron_sso.optim.config.SphereConfig` ``mode``. Megatron names
say what the family's base is (``muon_hyperball``: Muon's direction on the Frobenius sphere); an
``adam_hyperball`` is not offered (see docs/algorithm.md, Muon-Hyperball). Our Muon baseline is
``sso_muon``: ``muon`` is Megatron's own (emerging-optimizers) Muon with its ``muon_*`` settings,
and a user asking for it must get it, not ours under the same name."""

SPHERE_OPTIMIZERS = tuple(SPHERE_MODES)
"""``optimizer`` values that select our sphere-family optimizers."""

MEGATRON_SETTINGS: dict[str, tuple[type, Any, str]] = {
    "sso_split_qkv": (bool, True, "split fused QKV into one atomic module per Q head, K group, V group"),
    "sso_split_glu": (bool, True, "split a gated (SwiGLU) fc1 into its gate and up halves"),
    "sso_router_on_sphere": (bool, False, "optimise the MoE router weight on the sphere (default: AdamW)"),
    "sso_mup_init": (bool, False, "rescale every atomic module to its radius when the optimizer is built"),
    "sso_tp_mode": (str, "duplicated", "TP-sharded modules: 'duplicated' (all-gather, update, keep own slice)"),
    "sso_dp_shard": (bool, True, "update each atomic module on one data-parallel rank and all-gather the "
                     "result (state stays replicated); false: every rank updates every module"),
}
"""Settings of the Megatron integration itself (name: type, default, meaning)."""

_BASE_CLASS = None


def _base_optimizer_config():
    """Bridge's ``OptimizerConfig`` (defers ``__post_init__`` to ``finalize()``, which Bridge
    calls) when importable, else megatron-core's."""
    try:
        from megatron.bridge.training.config import OptimizerConfig
    except Exception:  # Bridge missing (Megatron-LM users) or not importable without CPU mode
        from megatron.core.optimizer import OptimizerConfig
    return OptimizerConfig


def _sphere_fields() -> list[tuple[str, type, Any]]:
    defaults = SphereConfig()
    out = []
    for f in dataclasses.fields(SphereConfig):
        if f.name == "mode":  # chosen by ``optimizer``
            continue
        value = getattr(defaults, f.name)
        out.append((f"sso_{f.name}", type(value), dataclasses.field(default=value)))
    for name, (typ, default, _) in MEGATRON_SETTINGS.items():
        out.append((name, typ, dataclasses.field(default=default)))
    for name, (typ, default, _) in SPECTRA_SETTINGS.items():
        out.append((name, Optional[typ] if default is None else typ, dataclasses.field(default=default)))
    return out


def _provide(config: Any):
    """``SSOOptimizerConfig.provide``: Megatron-Bridge >= 0.4 builds the optimizer with
    ``config.provide(model_chunks=..., config_overrides=..., use_gloo_process_groups=...,
    pg_collection=...)`` whenever the config object has that attribute. Ours has it exactly when it
    selects one of our optimizers (:func:`.factory.provide_for`); for ``adam``, ``sgd`` or Megatron's
    own Muon the attribute is absent (AttributeError, so ``hasattr`` is False) and Bridge runs its
    own factory as if the config were its own class. Bridge 0.3.1 never asks."""
    from .factory import provide_for  # the factory imports this module

    provide = provide_for(config)
    if provide is None:
        raise AttributeError(f"provide: optimizer={getattr(config, 'optimizer', None)!r} is built by "
                             "Megatron's own factory")
    return provide


def __getattr__(name: str):
    # Built lazily: importing this module must not import Megatron (pytest's process, layering).
    if name == "SSOOptimizerConfig":
        global _BASE_CLASS
        if _BASE_CLASS is None:
            _BASE_CLASS = dataclasses.make_dataclass(
                "SSOOptimizerConfig", _sphere_fields(), bases=(_base_optimizer_config(),),
                namespace={"__doc__": "Megatron OptimizerConfig plus the ``sso_*`` settings "
                                      "(see megatron_sso.mcore.optimizers.config).",
                           "__module__": __name__, "provide": property(_provide)},
            )
            _BASE_CLASS.__qualname__ = "SSOOptimizerConfig"
        return _BASE_CLASS
    raise AttributeError(name)


def sphere_config_from(config: Any) -> SphereConfig:
    """The :class:`SphereConfig` that ``config`` (a Megatron ``OptimizerConfig``) selects.

    ``config.optimizer`` is the mode; every ``sso_<field>`` attribute present overrides the
    SphereConfig default. Raises ValueError for an unknown optimizer name or a bad value.
    """
    mode = getattr(config, "optimizer", None)
    if mode not in SPHERE_OPTIMIZERS:
        raise ValueError(f"optimizer={mode!r} is not a sphere optimizer; choose one of {SPHERE_OPTIMIZERS}")
    values = {"mode": SPHERE_MODES[mode]}
    for name in SphereConfig.field_names():
        if name != "mode" and hasattr(config, f"sso_{name}"):
            values[name] = getattr(config, f"sso_{name}")
    return SphereConfig(**values)


def megatron_setting(config: Any, name: str) -> Any:
    """A Megatron-side setting (``sso_split_qkv``...) with its default when absent."""
    typ, default, _ = MEGATRON_SETTINGS[name]
    value = getattr(config, name, default)
    if typ is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    if name == "sso_tp_mode" and value != "duplicated":
        raise ValueError(f"sso_tp_mode={value!r} is not available yet; use 'duplicated' "
                         "(the sharded mode arrives with megatron_sso.distributed)")
    return value


