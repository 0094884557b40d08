"""Skip markers for tests that need optional packages.

``pytest.importorskip("megatron.bridge")`` cannot serve: without transformer-engine Bridge only
imports after the CPU mode has stubbed three modules, which must not happen in pytest's own
process. ``find_spec`` asks whether the package is installed without importing it.
"""

from __future__ import annotations

import importlib.util

import pytest


def missing(*modules: str) -> str:
    """The first of ``modules`` that is not installed, as a skip reason ("" if all are)."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed (scripts/install.sh)"
        except ModuleNotFoundError:
            return f"{name} is not installed (scripts/install.sh)"
    return ""


def needs(*modules: str) -> pytest.MarkDecorator:
    """``skipif`` marker for tests that need ``modules`` installed."""
    reason = missing(*modules)
    return pytest.mark.skipif(bool(reason), reason=reason or "installed")


MEGATRON = ("megatron.core", "megatron.bridge")
