"""The ``--spectra-*`` flags and ``signum`` / ``ademamix`` for Megatron-LM, without Megatron-LM.

The stand-in parser and ``get_megatron_optimizer_config`` of ``test_megatron_lm_args`` mimic
core_v0.16.1; the expected flags come from ``SPECTRA_SETTINGS`` itself, and the refusals are
compared with the Bridge CLI's (``megatron_sso.cli.recipe``), which must refuse the same inputs.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from megatron_sso.cli.recipe import RecipeError, _check_spectra
from megatron_sso.mcore.optimizers.spectra_settings import SPECTRA_SETTINGS, spectra_configs_from, spectra_enabled
from megatron_sso.mcore.megatron_lm.args import apply_spectra_settings, check_spectra_args, spectra_flags
from megatron_sso.mcore.megatron_lm.hooks import (ALL_NAMES, _wrap_add_arguments, _wrap_optimizer_config,
                                                  _wrap_validate_args)
from tests.megatron_lm.test_megatron_lm_args import (MEGATRON_LM_CHOICES, AdamConfigStandIn, megatron_like_get_config,
                                                     megatron_like_parser)


def parser() -> argparse.ArgumentParser:
    """Megatron-LM's parser as the launcher's ``add_megatron_arguments`` hook leaves it."""
    return _wrap_add_arguments(lambda p: p, ALL_NAMES)(megatron_like_parser())


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_optimizer_choices_gain_signum_and_ademamix():
    choices = next(a for a in parser()._actions if a.dest == "optimizer").choices
    assert choices == MEGATRON_LM_CHOICES + ["sso", "muon_sphere", "muon_hyperball", "signum", "ademamix"]
    for name in ("signum", "ademamix", "adam"):
        assert parse("--optimizer", name).optimizer == name


def test_every_spectra_setting_has_a_flag_with_its_type_and_default():
    p = parser()
    ours = {a.dest: a for a in p._actions if a.dest.startswith("spectra_")}
    assert set(ours) == set(SPECTRA_SETTINGS)
    defaults = p.parse_args([])
    for name, (typ, default, _) in SPECTRA_SETTINGS.items():
        assert option(name) in ours[name].option_strings
        value = getattr(defaults, name)
        assert value == default and type(value) is type(default), name  # omitted: the table's default
        if typ is bool:
            assert getattr(p.parse_args([option(name)]), name) is True
            assert getattr(p.parse_args(["--no-" + option(name)[2:]]), name) is False
            continue
        text = {float: "0.375", int: "7", str: "hard"}[typ]
        parsed = getattr(p.parse_args([option(name), text]), name)
        assert type(parsed) is typ and parsed == typ(text), name
        if default is None:  # nullable: "none" spells the default explicitly
            assert getattr(p.parse_args([option(name), text, option(name), "None"]), name) is None
            assert getattr(p.parse_args([option(name), "null"]), name) is None
        elif typ is not str:
            with pytest.raises(SystemExit):  # argparse: invalid float/int value
                p.parse_args([option(name), "none"])


def test_nullable_flags_are_exactly_the_none_defaults():
    assert {f.dest for f in spectra_flags() if f.nullable} == \
        {name for name, (_, default, _) in SPECTRA_SETTINGS.items() if default is None}
    with pytest.raises(SystemExit):
        parse("--spectra-post-clip", "five")


def test_help_lists_every_spectra_flag():
    text = parser().format_help()
    for name in SPECTRA_SETTINGS:
        assert option(name) in text


# A clip with an optimizer that has no SPECTRA form, bad values, refused Megatron flags.
REFUSED = [
    (("--optimizer", "sgd", "--spectra-post-clip", "1"), "not optimizer='sgd'"),
    (("--optimizer", "sso", "--spectra-pre-clip", "0.1"), "not optimizer='sso'"),
    (("--optimizer", "muon", "--spectra-post-clip", "1"), "not optimizer='muon'"),
    (("--optimizer", "dist_muon", "--spectra-pre-clip", "0.1"), "not optimizer='dist_muon'"),
    (("--optimizer", "adam", "--spectra-post-clip", "-1"), "spectra_post_clip"),
    (("--optimizer", "signum", "--spectra-mode", "medium"), "spectra_mode"),
    (("--optimizer", "ademamix", "--spectra-clip-dtype", "fp8"), "clip_dtype"),
    (("--optimizer", "signum", "--spectra-signum-momentum", "1.5"), "momentum"),
    (("--optimizer", "adam", "--spectra-post-clip", "1", "--spectra-clip-steps", "0"), "clip_steps"),
]
MEGATRON_REFUSED = [
    (("--optimizer", "adam", "--spectra-post-clip", "1", "--use-distributed-optimizer"), "--use-distributed-optimizer"),
    (("--optimizer", "signum", "--fp16"), "--fp16"),
    (("--optimizer", "ademamix", "--optimizer-cpu-offload"), "--optimizer-cpu-offload"),
    (("--optimizer", "adam", "--spectra-pre-clip", "0.1", "--use-precision-aware-optimizer"),
     "--use-precision-aware-optimizer"),
]


@pytest.mark.parametrize("argv, needle", REFUSED + MEGATRON_REFUSED)
def test_bad_spectra_settings_stop_validate_args_with_one_line(argv, needle):
    args = parse(*argv)
    with pytest.raises(ValueError, match=needle):
        check_spectra_args(args)
    seen = []
    validate = _wrap_validate_args(lambda a, defaults=None: seen.append(a))
    with pytest.raises(SystemExit) as exc:
        validate(args, {})
    message = str(exc.value.code)
    assert message.startswith("megatron_sso: ") and needle in message and "\n" not in message and not seen


@pytest.mark.parametrize("argv, needle", REFUSED)
def test_the_bridge_cli_refuses_the_same_settings(argv, needle):
    """One rule (``config.check_spectra``) for both front ends: the recipe check says the same."""
    args = parse(*argv)
    with pytest.raises(ValueError) as lm:
        check_spectra_args(args)
    with pytest.raises(RecipeError) as bridge:
        _check_spectra(SimpleNamespace(**vars(args)), "recipe.yaml")
    assert str(bridge.value) == f"recipe.yaml: optimizer: {lm.value}"


@pytest.mark.parametrize("argv", [
    (),                                                             # plain adam: Megatron's own
    ("--use-distributed-optimizer",),                               # ... with its distributed optimizer
    ("--spectra-post-clip", "0", "--use-distributed-optimizer"),    # a clip of 0 is off
    ("--optimizer", "sgd", "--spectra-mode", "hard"),               # no clip: nothing to refuse
    ("--optimizer", "sso",),
    ("--optimizer", "signum",),                                     # plain Signum on the matrices
    ("--optimizer", "ademamix", "--spectra-post-clip", "5", "--spectra-ademamix-alpha-warmup", "100"),
])
def test_accepted_settings_pass(argv):
    args = parse(*argv)
    check_spectra_args(args)
    seen = []
    _wrap_validate_args(lambda a, defaults=None: seen.append(a))(args, {})
    assert seen == [args]


def get_config(*argv: str):
    args = parse(*argv)
    config, overrides = _wrap_optimizer_config(megatron_like_get_config, ALL_NAMES)(args)
    assert overrides == {"overrides": 1}
    return args, config


@pytest.mark.parametrize("name", ["signum", "ademamix"])
def test_signum_and_ademamix_get_the_adam_config_and_the_spectra_values(name):
    """core_v0.16.1 raises "Invalid optimizer type!" for these names: the hook asks for the Adam
    config, restores the name and copies every ``spectra_*`` value, which the factory reads."""
    with pytest.raises(ValueError, match="Invalid optimizer"):
        megatron_like_get_config(parse("--optimizer", name))
    args, config = get_config("--optimizer", name, "--spectra-post-clip", "2", "--spectra-mode", "hard",
                              "--spectra-signum-momentum", "0.95", "--spectra-ademamix-beta3-warmup", "50",
                              "--adam-beta2", "0.95", "--lr", "0.01")
    assert args.optimizer == name and config.optimizer == name and config.lr == 0.01
    assert {k: getattr(config, k) for k in SPECTRA_SETTINGS} == {k: getattr(args, k) for k in SPECTRA_SETTINGS}
    cfg, base = spectra_configs_from(config)  # what the SPECTRA factory builds from it
    assert (cfg.base, cfg.clip, cfg.c, cfg.pre_clip) == ({"signum": "signum", "ademamix": "ademamix"}[name],
                                                        "hard", 2.0, False)
    if name == "signum":
        assert base.momentum == 0.95
    else:
        assert (base.beta2, base.beta3_warmup, base.alpha_warmup) == (0.95, 50, None)


def test_adam_with_a_clip_carries_the_spectra_values_and_plain_adam_stays_stock():
    args, config = get_config("--optimizer", "adam", "--spectra-post-clip", "1.0", "--adam-beta1", "0.8")
    assert config.optimizer == "adam" and spectra_enabled(config)
    cfg, base = spectra_configs_from(config)
    assert (cfg.base, cfg.clip, cfg.c, base.beta1) == ("adamw", "soft", 1.0, 0.8)
    for argv in ((), ("--spectra-post-clip", "0"), ("--spectra-mode", "hard")):
        _, config = get_config("--optimizer", "adam", *argv)
        assert config == AdamConfigStandIn(optimizer="adam")  # no attribute added
        assert not any(hasattr(config, k) for k in SPECTRA_SETTINGS)


def test_apply_spectra_settings_only_when_spectra_runs():
    for argv, applies in ((("--optimizer", "sgd"), False), (("--optimizer", "sso"), False),
                          (("--optimizer", "adam"), False), (("--optimizer", "signum"), True),
                          (("--optimizer", "adam", "--spectra-pre-clip", "0.1"), True)):
        config = apply_spectra_settings(AdamConfigStandIn(), parse(*argv))
        assert hasattr(config, "spectra_pre_clip") is applies, argv
