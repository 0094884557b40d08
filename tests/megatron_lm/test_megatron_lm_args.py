"""The Megatron-LM argument extension and optimizer-config hook, without Megatron-LM.

A stand-in parser declares ``--optimizer`` exactly as Megatron-LM core_v0.16.1's
``_add_training_args`` does (and the few other flags the checks read); the expected flags come straight from the two settings tables
(``SphereConfig`` fields, ``MEGATRON_SETTINGS``), not from the code under test.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest

from megatron_sso.mcore.optimizers.config import MEGATRON_SETTINGS, sphere_config_from
from megatron_sso.mcore.megatron_lm.args import (MEGATRON_LM_OPTIMIZERS, add_sso_arguments, apply_sso_settings,
                                                 check_sso_args, sso_flags)
from megatron_sso.mcore.megatron_lm.hooks import _wrap_optimizer_config, _wrap_validate_args
from megatron_sso.optim.config import SphereConfig

MEGATRON_LM_CHOICES = ["adam", "sgd", "muon", "dist_muon"]  # arguments.py, core_v0.16.1


def megatron_like_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group(title="training")
    group.add_argument("--optimizer", type=str, default="adam", choices=list(MEGATRON_LM_CHOICES))
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-08)
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--optimizer-cpu-offload", action="store_true")
    group.add_argument("--use-precision-aware-optimizer", action="store_true")
    return parser


def expected_settings() -> dict[str, tuple[type, object]]:
    """``{dest: (type, default)}`` from the tables the flags must mirror."""
    defaults = SphereConfig()
    out = {f"sso_{f.name}": (type(getattr(defaults, f.name)), getattr(defaults, f.name))
           for f in dataclasses.fields(SphereConfig) if f.name != "mode"}
    out.update({name: (typ, default) for name, (typ, default, _) in MEGATRON_SETTINGS.items()})
    return out


def non_default(typ: type, default, dest: str) -> str:
    """A command-line value different from ``default`` that the setting accepts."""
    special = {"sso_msign_coefficients": "muon5", "sso_msign_dtype": "bf16", "sso_power_dtype": "bf16",
               "sso_lambda_solver": "bisect", "sso_radius_mode": "identity", "sso_scale_mode": "identity",
               "sso_retract": "dynamic", "sso_msign_method": "gram", "sso_tp_mode": "sharded"}
    if dest in special:
        return special[dest]
    if typ is int:
        return str(default + 3)
    if typ is float:
        return repr(default * 0.5 + 0.03125)
    raise AssertionError(f"no test value for {dest} ({typ})")


def test_optimizer_choices_gain_ours_and_keep_megatrons():
    parser = add_sso_arguments(megatron_like_parser())
    choices = next(a for a in parser._actions if a.dest == "optimizer").choices
    assert choices == MEGATRON_LM_CHOICES + ["sso", "muon_sphere", "muon_hyperball"]
    assert choices.count("muon") == 1  # Megatron-LM's own Muon stays Megatron's
    assert MEGATRON_LM_OPTIMIZERS == ("sso", "muon_sphere", "muon_hyperball")
    for name in ("sso", "muon_sphere", "muon_hyperball", "muon"):
        assert parser.parse_args(["--optimizer", name]).optimizer == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "sso_typo"])


def test_every_setting_has_a_flag_with_its_type_and_default():
    parser = add_sso_arguments(megatron_like_parser())
    expected = expected_settings()
    options = {a.dest: a for a in parser._actions}
    ours = {d for d in options if d.startswith("sso_")}
    assert ours == set(expected), ours ^ set(expected)
    defaults = parser.parse_args([])
    for dest, (typ, default) in expected.items():
        assert getattr(defaults, dest) == default and type(getattr(defaults, dest)) is typ, dest
        flag = "--" + dest.replace("_", "-")
        assert flag in options[dest].option_strings
        if typ is bool:
            on, off = parser.parse_args([flag]), parser.parse_args(["--no-" + flag[2:]])
            assert getattr(on, dest) is True and getattr(off, dest) is False, dest
        else:
            text = non_default(typ, default, dest)
            value = getattr(parser.parse_args([flag, text]), dest)
            assert type(value) is typ and value == typ(text) and value != default, dest


def test_literal_setting_refuses_unknown_value_at_parse_time():
    parser = add_sso_arguments(megatron_like_parser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--sso-lambda-solver", "newton"])


def test_help_lists_every_flag():
    parser = add_sso_arguments(megatron_like_parser())
    text = parser.format_help()  # argparse %-formats help strings: must not raise
    for dest in expected_settings():
        assert "--" + dest.replace("_", "-") in text


def test_extension_is_idempotent_and_refuses_clashes():
    parser = add_sso_arguments(add_sso_arguments(megatron_like_parser()))
    assert sum(a.dest == "sso_momentum" for a in parser._actions) == 1
    assert next(a for a in parser._actions if a.dest == "optimizer").choices.count("sso") == 1
    clash = megatron_like_parser()
    clash.add_argument("--sso-momentum", type=float)
    with pytest.raises(ValueError, match="sso_momentum"):
        add_sso_arguments(clash)
    with pytest.raises(ValueError, match="--optimizer"):
        add_sso_arguments(argparse.ArgumentParser())


@dataclass
class AdamConfigStandIn:
    """The fields of Megatron's AdamOptimizerConfig the hook and factory touch."""

    optimizer: str = "adam"
    lr: Optional[float] = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-08
    use_distributed_optimizer: bool = False
    fp16: bool = False


def megatron_like_get_config(args):
    """What core_v0.16.1's ``get_megatron_optimizer_config`` does for these names."""
    if args.optimizer == "adam" or "muon" in args.optimizer:
        fields = {f.name for f in dataclasses.fields(AdamConfigStandIn)}
        return AdamConfigStandIn(**{k: v for k, v in vars(args).items() if k in fields}), {"overrides": 1}
    raise ValueError("Invalid optimizer type!")


def test_parsed_values_reach_the_optimizer_config():
    parser = add_sso_arguments(megatron_like_parser())
    args = parser.parse_args(["--optimizer", "sso", "--lr", "0.01", "--sso-lambda-tol", "1e-4",
                              "--no-sso-split-qkv", "--sso-msign-steps", "5"])
    get_config = _wrap_optimizer_config(megatron_like_get_config, MEGATRON_LM_OPTIMIZERS)
    config, overrides = get_config(args)
    assert overrides == {"overrides": 1} and args.optimizer == "sso"  # restored after the stock call
    assert config.optimizer == "sso" and config.lr == 0.01
    assert config.sso_lambda_tol == 1e-4 and config.sso_split_qkv is False
    sphere = sphere_config_from(config)  # what the factory builds from the config
    assert (sphere.mode, sphere.lambda_tol, sphere.msign_steps) == ("sso", 1e-4, 5)
    assert sphere.momentum == SphereConfig().momentum


def test_other_optimizers_pass_through_untouched():
    parser = add_sso_arguments(megatron_like_parser())
    get_config = _wrap_optimizer_config(megatron_like_get_config, MEGATRON_LM_OPTIMIZERS)
    for name in ("adam", "muon"):
        config, _ = get_config(parser.parse_args(["--optimizer", name]))
        assert config.optimizer == name and not hasattr(config, "sso_lambda_tol")
    with pytest.raises(ValueError, match="Invalid optimizer"):
        get_config(parser.parse_args(["--optimizer", "sgd"]))


def test_muon_sphere_mode_and_apply_on_namespace():
    args = add_sso_arguments(megatron_like_parser()).parse_args(["--optimizer", "muon_sphere"])
    config = apply_sso_settings(AdamConfigStandIn(), args)
    assert sphere_config_from(config) == SphereConfig(mode="muon_sphere")


def test_muon_hyperball_name_maps_to_hyperball_mode():
    args = add_sso_arguments(megatron_like_parser()).parse_args(["--optimizer", "muon_hyperball",
                                                                 "--sso-radius-scaler", "2"])
    config = apply_sso_settings(AdamConfigStandIn(), args)
    assert sphere_config_from(config) == SphereConfig(mode="hyperball", radius_scaler=2.0)


@pytest.mark.parametrize("argv, needle", [
    (["--sso-momentum", "1.5"], "momentum"),
    (["--sso-msign-method", "gram", "--sso-msign-dtype", "bf16"], "gram"),
    (["--sso-tp-mode", "sharded"], "sso_tp_mode='sharded'"),
    (["--use-distributed-optimizer"], "--use-distributed-optimizer"),
    (["--fp16"], "--fp16"),
])
def test_bad_settings_are_refused_before_training(argv, needle):
    parser = add_sso_arguments(megatron_like_parser())
    args = parser.parse_args(["--optimizer", "sso", *argv])
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        check_sso_args(args)
    seen = []
    validate = _wrap_validate_args(lambda a, defaults=None: seen.append(a))
    with pytest.raises(SystemExit) as exc:
        validate(args, {})
    message = str(exc.value.code)
    assert message.startswith("megatron_sso: ") and "\n" not in message and not seen
    check_sso_args(parser.parse_args(["--optimizer", "adam", *argv]))  # not ours: not our business
    validate(parser.parse_args(["--optimizer", "sso"]), {})
    assert len(seen) == 1


def test_flags_follow_the_tables():
    names = [f.dest for f in sso_flags()]
    assert names == [f"sso_{n}" for n in SphereConfig.field_names() if n != "mode"] + list(MEGATRON_SETTINGS)
    assert dict((f.dest, f.choices) for f in sso_flags())["sso_lambda_solver"] == ("secant", "bisect", "krylov")
