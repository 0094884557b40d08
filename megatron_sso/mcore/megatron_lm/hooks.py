"""The Megatron-LM launcher's hooks: a stock core_v0.16.1 tree, no source edited.

:func:`install_megatron_lm` puts three hooks in place, then the factory wrap:

1. ``megatron.training.arguments.add_megatron_arguments`` (``parse_args`` looks the name up at
   call time, whatever ``extra_args_provider`` the script passes) is wrapped to also run
   :func:`~.megatron_lm_args.add_sso_arguments` and
   :func:`~.megatron_lm_args.add_spectra_arguments`: our names join the ``--optimizer`` choices
   and the ``--sso-*`` / ``--spectra-*`` flags are added;
2. ``validate_args`` (core_v0.16.1: the name in ``megatron.training.initialize`` that
   ``initialize_megatron`` calls; 0.19: the one in ``megatron.training.arguments`` that
   ``parse_and_validate_args`` calls) first runs :func:`~.megatron_lm_args.check_sso_args` and
   :func:`~.megatron_lm_args.check_spectra_args`, so a bad value stops every rank with one
   line before ``torch.distributed`` or the model is set up;
3. ``megatron.training.training.get_megatron_optimizer_config``: core_v0.16.1 maps ``adam``
   and every name containing "muon" to ``AdamOptimizerConfig``, ``sgd`` to
   ``SGDOptimizerConfig`` and raises "Invalid optimizer type!" for anything else, so for
   ``sso`` and ``signum`` / ``ademamix`` the hook calls it with ``optimizer='adam'`` (the
   AdamW half of the chain uses that config's betas, eps and weight decay; AdamW / AdEMAMix
   hidden matrices read the betas too), restores the name and copies the ``sso_*`` or
   ``spectra_*`` values onto the config. ``adam`` with a clip on gets the ``spectra_*`` values.

Then :func:`~megatron_sso.mcore.optimizers.factory.install` wraps the factory names of
``megatron.training.training`` only (``sites=``; ``megatron.bridge`` is never imported):
``training.py`` sends ``sso``, ``signum``, ``ademamix`` and ``adam`` to ``get_megatron_optimizer``
and, the name containing "muon", ``muon_sphere`` to ``get_megatron_muon_optimizer``.
"""

from __future__ import annotations

import functools
import importlib
import runpy
import sys
from pathlib import Path
from typing import Sequence

from ..optimizers import spectra_selected
from .args import (MEGATRON_LM_OPTIMIZERS, MEGATRON_LM_SPECTRA_OPTIMIZERS, add_spectra_arguments,
                               add_sso_arguments, apply_spectra_settings, apply_sso_settings, check_spectra_args,
                               check_sso_args)

ALL_NAMES = MEGATRON_LM_OPTIMIZERS + MEGATRON_LM_SPECTRA_OPTIMIZERS
"""Every name the launcher adds to ``--optimizer``."""

SITE = "megatron.training.training"
"""The one module whose factory names the launcher wraps."""


def validate_args_sites(*modules):
    """The modules among ``modules`` that bind a ``validate_args`` name the loop may call:
    core_v0.16.1's ``initialize_megatron`` calls the name ``initialize`` imported, 0.19's
    ``parse_and_validate_args`` the one in ``arguments`` (``initialize`` no longer has it).
    Wrapping every binding present covers both without asking the version; each wrapper
    wraps the original, so a call still runs our checks once."""
    return tuple(m for m in modules if hasattr(m, "validate_args"))


def _wrap_add_arguments(original, names):
    sso = tuple(n for n in names if n in MEGATRON_LM_OPTIMIZERS)
    spectra = tuple(n for n in names if n in MEGATRON_LM_SPECTRA_OPTIMIZERS)

    @functools.wraps(original)
    def add_megatron_arguments(parser):
        return add_spectra_arguments(add_sso_arguments(original(parser), sso), spectra)

    add_megatron_arguments._megatron_sso_wrapped = True
    return add_megatron_arguments


def _wrap_validate_args(original):
    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        try:
            check_sso_args(args)
            check_spectra_args(args)
        except ValueError as exc:
            raise SystemExit(f"megatron_sso: {exc}") from None
        return original(args, *rest, **kwargs)

    validate_args._megatron_sso_wrapped = True
    return validate_args


def _wrap_optimizer_config(original, names):
    @functools.wraps(original)
    def get_megatron_optimizer_config(args):
        mode = args.optimizer
        if mode not in names and not spectra_selected(args):
            return original(args)  # Megatron's own optimizers, plain adam included
        args.optimizer = "adam"  # the stock Adam config: the AdamW half of the chain reads it
        try:
            result = original(args)
        finally:
            args.optimizer = mode
        config = result[0] if isinstance(result, tuple) else result  # 0.16.1: (config, overrides)
        if mode in MEGATRON_LM_OPTIMIZERS:
            apply_sso_settings(config, args)
        else:
            apply_spectra_settings(config, args)
        return result

    get_megatron_optimizer_config._megatron_sso_wrapped = True
    return get_megatron_optimizer_config


def _replace(module, attr: str, wrapper, *extra) -> bool:
    current = getattr(module, attr)
    if getattr(current, "_megatron_sso_wrapped", False):
        return False
    setattr(module, attr, wrapper(current, *extra))
    return True


def install_megatron_lm(names: Sequence[str] = ALL_NAMES) -> list[str]:
    """Put the three Megatron-LM hooks (module docstring) and the factory wrap in place;
    returns the names patched. Idempotent. Needs ``megatron.training`` importable."""
    unknown = sorted(set(names) - set(ALL_NAMES))
    if unknown:
        raise ValueError(f"cannot add optimizer name(s) {unknown} to Megatron-LM; ours are {ALL_NAMES}")
    names = tuple(names)
    arguments = importlib.import_module("megatron.training.arguments")
    initialize = importlib.import_module("megatron.training.initialize")
    training = importlib.import_module(SITE)
    patched = []
    for module, attr, wrapper, extra in (
        (arguments, "add_megatron_arguments", _wrap_add_arguments, (names,)),
        *((m, "validate_args", _wrap_validate_args, ()) for m in validate_args_sites(arguments, initialize)),
        (training, "get_megatron_optimizer_config", _wrap_optimizer_config, (names,)),
    ):
        if _replace(module, attr, wrapper, *extra):
            patched.append(f"{module.__name__}.{attr}")
    from ..optimizers import install

    return patched + install(names, sites=(SITE,))


class LaunchError(Exception):
    """A Megatron-LM launch problem to report in one line (exit code 2)."""


def run_megatron_lm_script(script: Path, argv: Sequence[str]) -> None:
    """Run Megatron-LM's ``script`` (e.g. ``pretrain_gpt.py``) as ``__main__`` with ``argv``,
    our hooks installed, and CPU mode on when no CUDA device is present.

    The script's folder goes first on ``sys.path``, as when running ``python pretrain_gpt.py``
    in the tree: the checkout's ``megatron`` package and its helper modules (``gpt_builders``,
    ``model_provider``) are the ones imported. Raises LaunchError when ``megatron.training``
    does not import from there.
    """
    from .cpu_mode import enable_megatron_lm_cpu_mode

    enable_megatron_lm_cpu_mode()  # before Megatron is imported; a no-op with CUDA
    root = str(script.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        importlib.import_module(SITE)
    except Exception as exc:  # ImportError, or a dependency failing at import time
        first = (str(exc).splitlines() or [""])[0]
        raise LaunchError(f"cannot import megatron.training from {root} ({type(exc).__name__}: {first}); "
                          "is it a Megatron-LM checkout at core_v0.16.1 with its dependencies installed?") from exc
    install_megatron_lm()
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
