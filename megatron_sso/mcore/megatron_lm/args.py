"""Megatron-LM (core_v0.16.1) arguments for our optimizers: names, flags, checks, config copy.

Megatron-LM's ``--optimizer`` choices are closed (``adam sgd muon dist_muon``) and its
``get_megatron_optimizer_config`` raises for any other name. This module holds what both routes
for Megatron-LM users share (the launcher's hooks in :mod:`.megatron_lm_hooks`, and
``patches/megatron-lm-core_v0.16.1-sso.patch``):

* :func:`add_sso_arguments` adds ``sso``, ``muon_sphere``, ``muon_hyperball`` to ``--optimizer`` and one ``--sso-*``
  flag per :class:`~megatron_sso.optim.config.SphereConfig` field and per
  :data:`~megatron_sso.mcore.optimizers.config.MEGATRON_SETTINGS` entry; :func:`add_spectra_arguments`
  adds ``signum``, ``ademamix`` and one ``--spectra-*`` flag per
  :data:`~megatron_sso.mcore.optimizers.config.SPECTRA_SETTINGS` entry. Types, defaults and help come from
  those tables, so flags and settings cannot drift. A setting whose default is ``None``
  (nullable) is ``None`` when the flag is omitted; ``none`` spells it explicitly.
* :func:`check_sso_args`, :func:`check_spectra_args` refuse bad values and combinations with a
  ValueError naming the value, before the model (or ``torch.distributed``) exists. The SPECTRA
  rule is :func:`~megatron_sso.mcore.optimizers.config.check_spectra`, the one the Bridge CLI applies.
* :func:`apply_sso_settings`, :func:`apply_spectra_settings` copy the values onto Megatron's
  Adam ``OptimizerConfig`` as attributes, where the factories read them.

``muon`` is *not* taken over: Megatron-LM 0.16.1 already offers ``--optimizer muon`` (its own
emerging-optimizers Muon) and ``dist_muon``, and replacing a choice users already rely on would
silently change their runs. Our Muon baseline stays available through Megatron-Bridge
(``megatron-sso pretrain --optimizer sso_muon``). ``adam`` stays Megatron's own Adam unless a
``--spectra-post-clip`` / ``--spectra-pre-clip`` is given.

Importing this module imports nothing from Megatron. The patch calls :func:`add_sso_arguments`,
:func:`add_spectra_arguments`, :func:`check_sso_args`, :func:`check_spectra_args`,
:func:`apply_sso_settings`, :func:`apply_spectra_settings` and
:func:`get_megatron_sso_optimizer`: keep their signatures
(``tests/megatron_lm/test_megatron_lm_patch.py`` checks the names exist).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ...optim.config import SphereConfig
from ..optimizers import (MEGATRON_SETTINGS, SPECTRA_OPTIMIZERS, SPECTRA_REFUSED, SPECTRA_SETTINGS, check_spectra,
                     megatron_setting, spectra_selected, sphere_config_from)

MEGATRON_LM_OPTIMIZERS = ("sso", "muon_sphere", "muon_hyperball")
"""Sphere names added to Megatron-LM's ``--optimizer`` choices (``muon`` stays Megatron's own)."""

MEGATRON_LM_SPECTRA_OPTIMIZERS = SPECTRA_OPTIMIZERS
"""SPECTRA names added to the choices (``adam`` is there already)."""

GROUP_TITLE = "megatron-sso"
SPECTRA_GROUP_TITLE = "megatron-sso SPECTRA"
NONE_SPELLINGS = ("none", "null")
"""Command-line spellings of ``None`` for a nullable setting (case-insensitive)."""


@dataclass(frozen=True)
class Flag:
    """One generated command-line flag: ``dest`` is the attribute it sets (``sso_*``,
    ``spectra_*``); ``nullable`` settings also take ``none``."""

    dest: str
    type: type
    default: Any
    help: str
    choices: Optional[tuple[str, ...]] = None
    nullable: bool = False

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def parse(self) -> Callable[[str], Any]:
        """The argparse ``type``: ``self.type``, plus ``none``/``null`` -> None when nullable."""
        if not self.nullable:
            return self.type
        typ = self.type

        def parse(text: str) -> Any:
            return None if text.strip().lower() in NONE_SPELLINGS else typ(text)

        parse.__name__ = typ.__name__  # argparse names it in "invalid float value: 'x'"
        return parse


SSOFlag = Flag  # the name before SPECTRA flags existed


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right after the field in the class
    body) as plain text for ``--help``; empty when the source is not available (a zipped install)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = _help_text(nxt.value.value)
    return docs


def _help_text(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")  # RST roles, literals
    return text.rstrip(".").replace("%", "%%")  # argparse %-formats help strings


@functools.lru_cache(maxsize=None)
def sso_flags() -> tuple[Flag, ...]:
    """The ``--sso-*`` flags: one per SphereConfig field except ``mode`` (chosen by
    ``--optimizer``), then one per Megatron-side setting; types, defaults and help come from
    those two tables. ``Literal`` fields get their values as ``choices``."""
    hints = typing.get_type_hints(SphereConfig)
    docs = _field_docs(SphereConfig)
    defaults = SphereConfig()
    flags = []
    for f in dataclasses.fields(SphereConfig):
        if f.name == "mode":
            continue
        hint, choices = hints[f.name], None
        if typing.get_origin(hint) is typing.Literal:
            choices = tuple(typing.get_args(hint))
            hint = type(choices[0])
        flags.append(Flag(f"sso_{f.name}", hint, getattr(defaults, f.name),
                          docs.get(f.name, f"SphereConfig.{f.name}"), choices))
    for name, (typ, default, meaning) in MEGATRON_SETTINGS.items():
        flags.append(Flag(name, typ, default, _help_text(meaning)))
    return tuple(flags)


@functools.lru_cache(maxsize=None)
def spectra_flags() -> tuple[Flag, ...]:
    """The ``--spectra-*`` flags, one per :data:`SPECTRA_SETTINGS` entry in table order; a
    ``None`` default makes the flag nullable (omitted or ``none``: None)."""
    return tuple(Flag(name, typ, default, _help_text(meaning), nullable=default is None)
                 for name, (typ, default, meaning) in SPECTRA_SETTINGS.items())


def _optimizer_action(parser: argparse.ArgumentParser) -> argparse.Action:
    for action in parser._actions:
        if action.dest == "optimizer" and "--optimizer" in action.option_strings:
            return action
    raise ValueError("the parser has no --optimizer option: pass Megatron-LM's argument parser "
                     "(megatron.training.arguments.add_megatron_arguments)")


def _add_flags(parser: argparse.ArgumentParser, names: Sequence[str], flags: tuple[Flag, ...], marker: str,
               title: str, description: str) -> argparse.ArgumentParser:
    """Add ``names`` to ``--optimizer``'s choices and ``flags`` as one argument group, once
    (``marker`` is set on the parser); ValueError on a destination the parser already has."""
    action = _optimizer_action(parser)
    if action.choices is not None:
        action.choices = list(action.choices) + [n for n in names if n not in action.choices]
    if getattr(parser, marker, False):
        return parser  # added before
    taken = {a.dest for a in parser._actions}
    clash = sorted(f.dest for f in flags if f.dest in taken)
    if clash:
        raise ValueError(f"the parser already defines {clash}: cannot add megatron-sso's {title} flags")
    group = parser.add_argument_group(title, description)
    for f in flags:
        shown = "none" if f.default is None else f.default
        if f.type is bool:
            group.add_argument(f.option, dest=f.dest, action=argparse.BooleanOptionalAction,
                               default=f.default, help=f"{f.help} (default: {shown})")
        else:
            group.add_argument(f.option, dest=f.dest, type=f.parse(), default=f.default, choices=f.choices,
                               help=f"{f.help} (default: {shown})")
    setattr(parser, marker, True)
    return parser


def add_sso_arguments(parser: argparse.ArgumentParser,
                      names: Sequence[str] = MEGATRON_LM_OPTIMIZERS) -> argparse.ArgumentParser:
    """Add ``names`` to ``--optimizer``'s choices and the ``--sso-*`` flags to ``parser``.

    Idempotent. Raises ValueError when the parser has no ``--optimizer`` or already defines an
    ``sso_*`` destination of its own (a clash we must not shadow).
    """
    return _add_flags(parser, names, sso_flags(), "_megatron_sso_flags", GROUP_TITLE,
                      f"Spectral Sphere Optimizer settings, used with --optimizer {' | '.join(names)} "
                      "(docs/megatron.md)")


def add_spectra_arguments(parser: argparse.ArgumentParser,
                          names: Sequence[str] = MEGATRON_LM_SPECTRA_OPTIMIZERS) -> argparse.ArgumentParser:
    """Add ``names`` to ``--optimizer``'s choices and the ``--spectra-*`` flags to ``parser``.

    Idempotent; ValueError as :func:`add_sso_arguments`."""
    return _add_flags(parser, names, spectra_flags(), "_megatron_sso_spectra_flags", SPECTRA_GROUP_TITLE,
                      "SPECTRA spectral clipping, used with --optimizer adam | "
                      f"{' | '.join(names)}; adam stays Megatron's own Adam unless --spectra-post-clip or "
                      "--spectra-pre-clip is given (docs/spectra.md)")


def sso_settings(args: Any) -> dict[str, Any]:
    """``{sso_name: value}`` for every ``--sso-*`` flag, read off parsed ``args`` (defaults for
    absent ones, so a namespace from an older parser still works)."""
    return {f.dest: getattr(args, f.dest, f.default) for f in sso_flags()}


def spectra_settings(args: Any) -> dict[str, Any]:
    """``{spectra_name: value}`` for every ``--spectra-*`` flag (defaults for absent ones)."""
    return {f.dest: getattr(args, f.dest, f.default) for f in spectra_flags()}


def check_sso_args(args: Any) -> None:
    """Raise ValueError naming the bad value when ``args.optimizer`` is ours and a setting or
    combination is refused (the same checks the factory makes, done before the model exists)."""
    mode = getattr(args, "optimizer", None)
    if mode not in MEGATRON_LM_OPTIMIZERS:
        return
    sphere_config_from(args)  # every SphereConfig value (and their combinations)
    for name in MEGATRON_SETTINGS:
        megatron_setting(args, name)
    if getattr(args, "use_distributed_optimizer", False):
        raise ValueError(f"--optimizer {mode} with --use-distributed-optimizer: Megatron's distributed optimizer "
                         "cuts matrices into flat slices, but every atomic module must be updated whole; drop it")
    if getattr(args, "fp16", False):
        raise ValueError(f"--optimizer {mode} with --fp16 is not supported; use --bf16 or fp32")




def check_spectra_args(args: Any) -> None:
    """Raise ValueError naming the bad value when the ``--spectra-*`` values do not make a valid
    set-up for ``args.optimizer`` (:func:`~.config.check_spectra`: bad values for adam / signum /
    ademamix, a clip with any other optimizer) or when SPECTRA runs with a refused flag."""
    check_spectra(args)
    if not spectra_selected(args):
        return
    for dest, why in SPECTRA_REFUSED:
        if getattr(args, dest, False):
            raise ValueError(f"--optimizer {args.optimizer} with SPECTRA and --{dest.replace('_', '-')}: {why}")


def apply_sso_settings(config: Any, args: Any) -> Any:
    """Set ``config.optimizer`` to ``args.optimizer`` and every ``sso_*`` value as an attribute."""
    config.optimizer = args.optimizer
    for name, value in sso_settings(args).items():
        setattr(config, name, value)
    return config


def apply_spectra_settings(config: Any, args: Any) -> Any:
    """When ``args`` select SPECTRA (``signum``, ``ademamix``, or ``adam`` with a clip on), set
    ``config.optimizer`` to ``args.optimizer`` and every ``spectra_*`` value as an attribute;
    otherwise leave ``config`` untouched (plain ``adam`` stays Megatron's, attribute for
    attribute). Returns ``config``."""
    if spectra_selected(args):
        config.optimizer = args.optimizer
        for name, value in spectra_settings(args).items():
            setattr(config, name, value)
    return config


def get_megatron_sso_optimizer(config: Any, model_chunks: list, **kwargs: Any):
    """Build our optimizer for a config that :func:`apply_sso_settings` or
    :func:`apply_spectra_settings` filled: the sphere factory for ``sso`` / ``muon_sphere``,
    the SPECTRA factory otherwise (it refuses a name without a SPECTRA form). For the patched
    tree's ``setup_model_and_optimizer``; ``kwargs`` go to the factory."""
    if config.optimizer in MEGATRON_LM_OPTIMIZERS:
        from ..optimizers import get_sphere_megatron_optimizer

        return get_sphere_megatron_optimizer(config, model_chunks, **kwargs)
    from ..optimizers import get_spectra_megatron_optimizer

    return get_spectra_megatron_optimizer(config, model_chunks, **kwargs)
