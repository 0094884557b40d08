"""Megatron-LM's training loop from the megatron-core wheel, with our GPT providers.

The megatron-core >= 0.17 wheels ship ``megatron.training`` (Megatron-LM's ``pretrain()``, its
arguments, checkpointing and logging) but not ``pretrain_gpt.py``. When no checkout is named
(``MEGATRON_LM_DIR`` unset), :func:`run_builtin_gpt` plays that script's part: it parses
Megatron-LM's arguments (our ``--optimizer`` names and ``--sso-*`` / ``--spectra-*`` flags
included, :mod:`.hooks`), builds Megatron-LM's config container from them and calls
``pretrain()`` with the providers of :mod:`.gpt_providers`. Every argument is Megatron-LM's.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Sequence

from .hooks import SITE, LaunchError

MODEL_CONFIG_ADVICE = ".*recommended to use a ModelConfig.*"
"""The warning ``pretrain_cfg_container_from_args`` (0.19) gives whenever no model config is
passed: ours is a model provider, the form ``pretrain()`` still takes, so it does not apply."""


def builtin_unavailable() -> str:
    """Why the built-in script cannot run here ("" when it can); the release question is the
    version adapter's (:func:`megatron_sso.mcore.compat.builtin_gpt_unavailable`)."""
    from ..compat import builtin_gpt_unavailable

    return builtin_gpt_unavailable()


def pretrain_gpt() -> None:
    """What Megatron-LM's ``pretrain_gpt.py`` does for a plain GPT, with our providers:
    parse and validate the arguments (``sys.argv``), refuse what the providers do not support
    before ``torch.distributed`` is set up, build the config container, train."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from .gpt_providers import check_supported, gpt_datasets_provider, gpt_forward_step, gpt_model_provider

    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})  # the script's default
    try:
        check_supported(args)
    except ValueError as exc:
        raise SystemExit(f"megatron_sso: {exc}") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MODEL_CONFIG_ADVICE)
        cfg = pretrain_cfg_container_from_args(args, None)
    pretrain(cfg, gpt_datasets_provider, ModelType.encoder_or_decoder, gpt_forward_step,
             model_provider=gpt_model_provider)


def run_builtin_gpt(argv: Sequence[str]) -> None:
    """Run :func:`pretrain_gpt` with ``argv``, our hooks installed and CPU mode on when no CUDA
    device is present. LaunchError when :func:`builtin_unavailable` says why not, or when
    ``megatron.training`` fails to import."""
    problem = builtin_unavailable()
    if problem:
        raise LaunchError(problem)
    from .cpu_mode import enable_megatron_lm_cpu_mode

    enable_megatron_lm_cpu_mode()  # before Megatron is imported; a no-op with CUDA
    try:
        importlib.import_module(SITE)
        utils = importlib.import_module("megatron.core.datasets.utils")
    except Exception as exc:  # ImportError, or a dependency failing at import time
        first = (str(exc).splitlines() or [""])[0]
        raise LaunchError(f"cannot import megatron.training from the installed megatron-core "
                          f"({type(exc).__name__}: {first})") from exc
    from ..cpu import skip_compile_helpers_when_prebuilt
    from .hooks import install_megatron_lm

    skip_compile_helpers_when_prebuilt(utils)  # the wheel has the built helpers and no Makefile, GPU or not
    install_megatron_lm()
    sys.argv = ["python -m megatron_sso.megatron_lm", *argv]
    pretrain_gpt()
