"""SPECTRA's Megatron settings: which optimizer names reach which builder, how ``spectra_*``
values become a SpectraConfig, and that bad values are errors naming the key (no Megatron
import needed: the builder refuses before it touches Megatron)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from megatron_sso.mcore.optimizers.spectra_settings import SPECTRA_SETTINGS, spectra_configs_from, spectra_enabled
from megatron_sso.mcore.optimizers.factory import _wrap
from megatron_sso.optim import AdamWConfig, AdEMAMixConfig, SignumConfig

ADAM = dict(adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6)


def _config(optimizer="adam", **values):
    return SimpleNamespace(optimizer=optimizer, use_distributed_optimizer=True, **ADAM, **values)


def _stock(config, model_chunks, *args, **kwargs):
    return "stock"


@pytest.mark.parametrize("optimizer, values, routed", [
    ("adam", {}, False),  # plain adam: Megatron's own, untouched
    ("adam", {"spectra_post_clip": None, "spectra_pre_clip": 0.0}, False),
    ("adam", {"spectra_post_clip": 5.0}, True),
    ("adam", {"spectra_pre_clip": 0.1}, True),
    ("signum", {}, True),
    ("ademamix", {"spectra_post_clip": 10}, True),
    ("sgd", {"spectra_post_clip": 5.0}, False),
])
def test_names_reach_the_spectra_builder(optimizer, values, routed):
    factory = _wrap(_stock, ("sso", "muon_sphere", "muon", "signum", "ademamix"))
    config = _config(optimizer, **values)
    if routed:  # the SPECTRA builder's first refusal proves it was reached
        with pytest.raises(ValueError, match="SPECTRA and use_distributed_optimizer=True"):
            factory(config, [])
    else:
        assert factory(config, []) == "stock"


def test_settings_map_onto_spectra_config():
    cfg, base = spectra_configs_from(_config(spectra_post_clip=5, spectra_mode="hard", spectra_clip_steps=7))
    assert (cfg.base, cfg.clip, cfg.c, cfg.clip_steps, cfg.pre_clip) == ("adamw", "hard", 5.0, 7, False)
    assert base == AdamWConfig(beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.0)
    cfg, base = spectra_configs_from(_config("signum", spectra_pre_clip=0.1, spectra_signum_momentum=0.5))
    assert (cfg.clip, cfg.pre_clip, cfg.pre_clip_c) == ("none", True, 0.1)  # no post-clip: plain Signum
    assert base == SignumConfig(momentum=0.5)
    cfg, base = spectra_configs_from(_config("ademamix", spectra_post_clip=1.0, spectra_ademamix_alpha_warmup=100))
    assert base == AdEMAMixConfig(beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.0, alpha_warmup=100)
    assert cfg.clip == "soft" and cfg.shape_scale and cfg.clip_dtype == "fp32"


@pytest.mark.parametrize("values, key", [
    ({"spectra_post_clip": -1.0}, "spectra_post_clip"),
    ({"spectra_pre_clip": float("nan")}, "spectra_pre_clip"),
    ({"spectra_post_clip": "five"}, "spectra_post_clip"),
    ({"spectra_mode": "medium"}, "spectra_mode"),
    ({"spectra_clip_dtype": "fp16"}, "clip_dtype"),
    ({"spectra_clip_steps": 0}, "clip_steps"),
    ({"spectra_shape_scale": 1}, "spectra_shape_scale"),
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        spectra_configs_from(_config(**values))


def test_every_setting_becomes_a_typed_config_field():
    """The fields SSOOptimizerConfig is built from (built without importing Megatron here:
    Bridge must not be imported in pytest's process)."""
    from megatron_sso.mcore.optimizers.config import _sphere_fields

    fields = {name: (tp, f.default) for name, tp, f in _sphere_fields()}
    for name, (typ, default, meaning) in SPECTRA_SETTINGS.items():
        assert fields[name] == ((typ | None) if default is None else typ, default) and meaning, name
    defaults = SimpleNamespace(**{name: default for name, (_, default, _) in SPECTRA_SETTINGS.items()}, **ADAM,
                               optimizer="adam")
    assert not spectra_enabled(defaults)  # off by default: stock Adam
    assert spectra_configs_from(defaults)[0].clip == "none"
