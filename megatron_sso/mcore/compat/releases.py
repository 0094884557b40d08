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


BUILTIN_GPT_RELEASES = ((0, 19),)
"""megatron-core ``(major, minor)`` releases whose ``megatron.training.pretrain()`` our built-in GPT
script (``megatron_lm/builtin_gpt.py``) calls: ``pretrain(cfg_container, datasets_provider,
model_type, forward_step, model_provider=...)`` (core_v0.19.0 ``megatron/training/training.py``,
the same file as the 0.19.2 wheel's). 0.17 takes the providers positionally with no container,
0.18 a container and the model provider second; neither is tested, so they are not accepted."""


def builtin_gpt_unavailable() -> str:
    """Why Megatron-LM's loop cannot run from the installed wheel with our built-in GPT script
    ("" when it can): megatron-core missing, a release without ``megatron.training`` (0.16 ships
    none; 0.17+ do, without ``pretrain_gpt.py``) or one whose ``pretrain()`` it does not call."""
    found = release("megatron-core")
    if found is None:
        return "megatron-core is not installed"
    if importlib.util.find_spec("megatron.training") is None:
        return f"megatron-core {found[0]}.{found[1]} does not ship megatron.training (0.17 and later do)"
    if found not in BUILTIN_GPT_RELEASES:
        known = ", ".join(f"{a}.{b}" for a, b in BUILTIN_GPT_RELEASES)
        return f"the built-in GPT script supports megatron-core {known}, not {found[0]}.{found[1]}"
    return ""


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
