"""The SPECTRA settings of a Megatron ``OptimizerConfig`` and the configs they build.

``optimizer: adam | signum | ademamix`` with ``spectra_*`` keys (docs/spectra.md). This module
holds the settings table, their checks and :func:`spectra_configs_from` (settings -> the torch-level
:class:`~megatron_sso.optim.spectra.SpectraConfig` and base-optimiser config). It imports nothing from
Megatron, so :mod:`.config` (the dataclass fields), :mod:`.spectra_factory` (the builder), the Bridge
CLI and the Megatron-LM flags all read one table without importing each other.
"""

from __future__ import annotations

from typing import Any, Optional

from ...optim.ademamix import AdEMAMixConfig
from ...optim.signum import SignumConfig
from ...optim.spectra import DEFAULT_CLIP_C, DEFAULT_PRE_CLIP_C, AdamWConfig, SpectraConfig

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

BASES = {"adam": "adamw", "signum": "signum", "ademamix": "ademamix"}
"""Megatron ``optimizer`` value -> SPECTRA base optimiser."""


def _level(config: Any, name: str) -> Optional[float]:
    value = spectra_setting(config, name)
    if value is None or value == 0.0:
        return None
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be null, 0 (off) or a positive finite number, got {value!r}")
    return value


def spectra_configs_from(config: Any) -> tuple[SpectraConfig, Any]:
    """``(SpectraConfig, base config)`` for a Megatron ``OptimizerConfig``.

    The base config takes ``adam_beta1``, ``adam_beta2``, ``adam_eps`` (AdamW, AdEMAMix) and the
    ``spectra_signum_*`` / ``spectra_ademamix_*`` settings; its weight decay is a placeholder
    (each param group's scheduled value is used). Raises ValueError naming the bad key.
    """
    mode = getattr(config, "optimizer", None)
    if mode not in BASES:
        raise ValueError(f"optimizer={mode!r} has no SPECTRA form; choose one of {sorted(BASES)}")
    post, pre = _level(config, "spectra_post_clip"), _level(config, "spectra_pre_clip")
    clip = spectra_setting(config, "spectra_mode")
    if clip not in ("soft", "hard"):
        raise ValueError(f"spectra_mode must be 'soft' or 'hard', got {clip!r}")
    values = {f: spectra_setting(config, f"spectra_{f}")
              for f in ("clip_steps", "clip_dtype", "shape_scale", "stats_power_iters")}
    try:
        cfg = SpectraConfig(base=BASES[mode], clip=clip if post else "none", c=post or DEFAULT_CLIP_C["cosine"],
                            pre_clip=pre is not None, pre_clip_c=pre or DEFAULT_PRE_CLIP_C, **values)
    except ValueError as exc:
        raise ValueError(f"bad SPECTRA setting (optimizer.spectra_<name>): {exc}") from None
    betas = dict(beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps)
    try:
        if mode == "adam":
            base = AdamWConfig(**betas, weight_decay=0.0)
        elif mode == "signum":
            base = SignumConfig(momentum=spectra_setting(config, "spectra_signum_momentum"))
        else:
            base = AdEMAMixConfig(**betas, weight_decay=0.0,
                                  beta3=spectra_setting(config, "spectra_ademamix_beta3"),
                                  alpha=spectra_setting(config, "spectra_ademamix_alpha"),
                                  alpha_warmup=spectra_setting(config, "spectra_ademamix_alpha_warmup"),
                                  beta3_warmup=spectra_setting(config, "spectra_ademamix_beta3_warmup"))
    except ValueError as exc:
        raise ValueError(f"optimizer={mode!r}: {exc} (adam_beta1/adam_beta2/adam_eps or spectra_{mode}_*)") from None
    return cfg, base


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
    building the configs the factory would build; for any other optimizer (``sso``, ``sso_muon``, ``muon``,
    ``sgd``...) a clip that is on is an error rather than silently ignored. The one rule the
    Bridge CLI (recipes) and the Megatron-LM flags both apply, before any rank starts."""
    mode = getattr(config, "optimizer", None)
    if mode in SPECTRA_OPTIMIZERS or mode == "adam":
        spectra_configs_from(config)
    elif spectra_enabled(config):
        raise ValueError(f"spectra_post_clip / spectra_pre_clip apply to adam, signum and ademamix, "
                         f"not optimizer={mode!r}")
