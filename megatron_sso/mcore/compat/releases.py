"""Every difference between the Megatron releases we support that our code has to know about.

Two stacks are supported and tested (``requirements/megatron-cpu*.txt``): megatron-core 0.16.1 with
Megatron-Bridge 0.3.1 (Python 3.11) and megatron-core 0.19.2 with Megatron-Bridge 0.6.2 (Python
3.12). Each function below answers one question that the rest of the code would otherwise answer
with an ``if version``; versions come from the installed distributions' metadata, so asking costs
no Megatron import. The differences that need no answer here (the code is the same on both) are
listed in docs/megatron.md, "Megatron releases".
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

BRIDGE_OPTIMIZER_SITE = "megatron.bridge.training.optim"
"""Bridge's module that imports Megatron's optimizer factory by name (``setup_optimizer``)."""

MEGATRON_LM_OPTIMIZER_SITE = "megatron.training.training"
"""Megatron-LM's module that imports the factory by name (``setup_model_and_optimizer``)."""

PROVIDE_SINCE_BRIDGE = (0, 4)
"""Megatron-Bridge 0.4.0 (PR #2132): ``setup_optimizer`` calls ``optimizer_config.provide(
model_chunks=, config_overrides=, use_gloo_process_groups=, pg_collection=)`` when the config
object has a ``provide`` attribute, instead of calling the factory it imported."""

RESILIENCY_STUBS = ("nvidia_resiliency_ext", "nvidia_resiliency_ext.inprocess")
"""What Megatron-Bridge 0.6's ``training/pretrain.py`` imports from nvidia-resiliency-ext at module
level (``from nvidia_resiliency_ext.inprocess import CallWrapper``, used as a type annotation)."""


def release(distribution: str) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of an installed distribution (``"megatron-core"``), None if absent."""
    try:
        text = version(distribution)
    except PackageNotFoundError:
        return None
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def bridge_calls_provide() -> bool:
    """Whether the installed Megatron-Bridge builds the optimizer through the config's
    ``provide()`` hook (0.4+), so that our optimizers need no wrapping of Bridge."""
    found = release("megatron-bridge")
    return found is not None and found >= PROVIDE_SINCE_BRIDGE


def factory_call_sites() -> tuple[str, ...]:
    """Modules whose ``get_megatron_optimizer`` (and ``get_megatron_muon_optimizer``) names
    :func:`megatron_sso.mcore.optimizers.install` wraps: Megatron-LM's always (every release
    imports the name directly), Bridge's only before 0.4 (later Bridges call ``provide()``)."""
    sites = () if bridge_calls_provide() else (BRIDGE_OPTIMIZER_SITE,)
    return sites + (MEGATRON_LM_OPTIMIZER_SITE,)


def absent_module_stubs() -> tuple[tuple[str, str, bool], ...]:
    """``(module, why, is_package)`` for modules a supported release imports unconditionally
    although the lock leaves their distribution out; CPU mode serves them as stubs.

    nvidia-resiliency-ext: megatron-core 0.19 asks for 0.6.0, which PyPI has only for glibc >= 2.39
    (these machines: Debian 12, glibc 2.36); the 0.4.1 that installs has no ``__version__``, and
    ``import megatron.core`` 0.19 then raises AttributeError (its NVRx version check, measured). So the
    3.12 lock omits it, and Bridge 0.6's ``pretrain.py`` still imports one name from it. The stub
    package holds only :data:`RESILIENCY_STUBS`: every other ``nvidia_resiliency_ext.*`` import
    still fails as "not installed", which is what Megatron's optional paths test for.
    """
    if release("megatron-bridge") is None or release("megatron-bridge") < PROVIDE_SINCE_BRIDGE:
        return ()
    if importlib.util.find_spec("nvidia_resiliency_ext") is not None:
        return ()
    why = "needs nvidia-resiliency-ext, which is not installed (requirements/megatron-cpu312.in)"
    return tuple((name, why, name.count(".") == 0) for name in RESILIENCY_STUBS)
