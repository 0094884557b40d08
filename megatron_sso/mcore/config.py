"""Where the sphere optimizers' settings live in a Megatron ``OptimizerConfig``.

Megatron's factory receives one ``OptimizerConfig`` object and ``ChainedOptimizer`` asserts
that every member optimizer holds an *equal* config, so the SSO settings must travel inside
that same object. We subclass the config class (Bridge's deferred-post-init
``OptimizerConfig`` when Megatron-Bridge is importable, else megatron-core's) and add one
``sso_<field>`` attribute per :class:`~megatron_sso.optim.config.SphereConfig` field plus a
few Megatron-side settings, and the ``spectra_*`` settings of :data:`SPECTRA_SETTINGS`
(``optimizer: adam | signum | ademamix`` with SPECTRA clipping). Because the subclass is a
real dataclass, Bridge's YAML merge and Hydra overrides see the fields:
``optimizer.sso_lambda_tol=1e-4`` or ``optimizer.spectra_post_clip=5`` work, and a YAML may name
the class with ``_target_: megatron_sso.mcore.config.SSOOptimizerConfig``.

A plain ``OptimizerConfig`` works too: missing ``sso_*`` attributes take the defaults
(Megatron-LM's argument hook sets them as attributes on the stock object).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..optim.config import SphereConfig

SPHERE_OPTIMIZERS = ("sso", "muon_sphere", "muon")
"""``optimizer`` values that select our optimizers (the value is the SphereConfig ``mode``)."""

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

SPECTRA_OPTIMIZERS = ("signum", "ademamix")
"""``optimizer`` values that always select SPECTRA's Megatron builder (:mod:`.spectra_factory`);
``adam`` selects it too when :func:`spectra_enabled` (otherwise Megatron's own Adam runs)."""

SPECTRA_SETTINGS: dict[str, tuple[type, Any, str]] = {
    "spectra_post_clip": (float, None, "post-clip level c of every 2-D hidden atomic module's update "
                          "(SPECTRA: 5 with cosine lr, 10 with WSD); null or 0: off"),
    "spectra_pre_clip": (float, None, "soft-clip level of raw 2-D gradients before global-norm clipping "
                         "(SPECTRA: 0.1); null or 0: off"),
    "spectra_mode": (str, "soft", "post-clip 'soft' sigma/sqrt(1+sigma^2/c^2) (Newton-Schulz) or 'hard' "
                     "min(sigma, c) (SVD)"),
    "spectra_clip_steps": (int, 10, "Newton-Schulz steps of the soft clip"),
    "spectra_clip_dtype": (str, "fp32", "compute dtype of the clips: fp32, bf16 or fp64"),
    "spectra_shape_scale": (bool, True, "multiply each clipped update by sqrt(max(1, d_out/d_in))"),
    "spectra_stats_power_iters": (int, 4, "power iterations per module for the logged ||D||_2; 0: off"),
    "spectra_split_qkv": (bool, True, "clip each Q head, K group and V group of a fused QKV separately"),
    "spectra_split_glu": (bool, True, "clip the gate and up halves of a gated (SwiGLU) fc1 separately"),
    "spectra_signum_momentum": (float, 0.9, "Signum's gradient EMA coefficient (optimizer=signum)"),
    "spectra_ademamix_beta3": (float, 0.9999, "AdEMAMix slow EMA coefficient (optimizer=ademamix)"),
    "spectra_ademamix_alpha": (float, 8.0, "AdEMAMix weight of the slow EMA"),
    "spectra_ademamix_alpha_warmup": (int, None, "AdEMAMix alpha warm-up steps (authors: all steps); null: none"),
    "spectra_ademamix_beta3_warmup": (int, None, "AdEMAMix beta3 warm-up steps (authors: all steps); null: none"),
}
"""SPECTRA settings (name: type, default, meaning); a ``None`` default means the value may be
null. AdamW and AdEMAMix take ``adam_beta1``, ``adam_beta2`` and ``adam_eps`` from the same
config, and every base its (scheduled) weight decay from Megatron's param groups."""

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


def __getattr__(name: str):
    # Built lazily: importing this module must not import Megatron (pytest's process, layering).
    if name == "SSOOptimizerConfig":
        global _BASE_CLASS
        if _BASE_CLASS is None:
            _BASE_CLASS = dataclasses.make_dataclass(
                "SSOOptimizerConfig", _sphere_fields(), bases=(_base_optimizer_config(),),
                namespace={"__doc__": "Megatron OptimizerConfig plus the ``sso_*`` settings "
                                      "(see megatron_sso.mcore.config).",
                           "__module__": __name__},
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
    values = {"mode": mode}
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


def spectra_setting(config: Any, name: str) -> Any:
    """A SPECTRA setting (``spectra_post_clip``...) with its default when absent, type-checked
    (ints are accepted for floats; ``None`` only where the default is ``None``)."""
    typ, default, _ = SPECTRA_SETTINGS[name]
    value = getattr(config, name, default)
    if value is None and default is None:
        return None
    ok = isinstance(value, bool) if typ is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) if typ is float else
        isinstance(value, typ) and not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{name} must be {'a' if default is not None else 'null or a'} {typ.__name__}, "
                         f"got {value!r}")
    return float(value) if typ is float else value


def spectra_enabled(config: Any) -> bool:
    """Whether ``config`` turns SPECTRA on: a post-clip or a pre-clip level that is set and nonzero."""
    return any(spectra_setting(config, name) for name in ("spectra_post_clip", "spectra_pre_clip"))


SPECTRA_REFUSED = (
    ("use_distributed_optimizer", "Megatron's distributed optimizer cuts matrices into flat slices, but every "
                                  "atomic module must be clipped whole; turn it off"),
    ("fp16", "is not supported; use bf16 or fp32"),
    ("optimizer_cpu_offload", "is not supported"),
    ("use_precision_aware_optimizer", "is not supported (it needs Transformer Engine's Adam)"),
)
"""Settings refused with SPECTRA, and why (same attribute names on an ``OptimizerConfig`` and
on Megatron-LM's parsed arguments): the factory refuses them for Bridge users, the Megatron-LM
launcher before ``torch.distributed`` is set up."""


def spectra_selected(config: Any) -> bool:
    """Whether SPECTRA's builder handles ``config.optimizer``: ``signum`` and ``ademamix``
    always, ``adam`` only with a clip on (plain ``adam`` is Megatron's own Adam)."""
    mode = getattr(config, "optimizer", None)
    return mode in SPECTRA_OPTIMIZERS or (mode == "adam" and spectra_enabled(config))


def check_spectra(config: Any) -> None:
    """Raise ValueError naming the key unless the ``spectra_*`` values on ``config`` (an
    ``OptimizerConfig`` or Megatron-LM's parsed arguments) make a valid SPECTRA set-up for
    ``config.optimizer``: for ``adam``/``signum``/``ademamix`` every value is checked by
    building the configs the factory would build; for any other optimizer (``sso``, ``muon``,
    ``sgd``...) a clip that is on is an error rather than silently ignored. The one rule the
    Bridge CLI (recipes) and the Megatron-LM flags both apply, before any rank starts."""
    mode = getattr(config, "optimizer", None)
    if mode in SPECTRA_OPTIMIZERS or mode == "adam":
        from .spectra_factory import spectra_configs_from  # imports nothing from Megatron

        spectra_configs_from(config)
    elif spectra_enabled(config):
        raise ValueError(f"spectra_post_clip / spectra_pre_clip apply to adam, signum and ademamix, "
                         f"not optimizer={mode!r}")
