"""Megatron-Core / Megatron-Bridge integration: the only package that imports ``megatron.*``.

Five rooms, each with a face (its ``__init__``) that names what the rest of the code may use;
nothing heavy is imported until a name is used:

* :mod:`.optimizers` -- ``install()`` and ``SSOOptimizerConfig``: ``optimizer: sso | muon_sphere |
  sso_muon | muon_hyperball`` (``muon`` stays Megatron's own) and SPECTRA's ``adam | signum | ademamix`` through Megatron's optimizer factory (routing,
  atomic-module layouts, TP gathers, DP sharding, the checkpointable torch optimizers). Start here.
* :mod:`.observe` -- what a run reports: per-interval optimizer statistics for Megatron's logger
  and opt-in monitoring (activations, exact spectral norms, router MaxVio).
* :mod:`.cpu` -- ``enable_cpu_mode()``: run Megatron on a CPU with gloo (a no-op with CUDA).
* :mod:`.bridge` -- run Bridge's real ``pretrain()`` on a tiny GPT in N local ranks, layer specs.
* :mod:`.megatron_lm` -- Megatron-LM's own loop: ``--sso-*`` / ``--spectra-*`` flags, hooks and the
  launcher behind ``python -m megatron_sso.megatron_lm``.

Rooms import each other only through faces, in the order ``cpu -> optimizers -> observe ->
bridge | megatron_lm`` (``tests/test_layering.py``). The most used names are also here:
``from megatron_sso.mcore import install, SSOOptimizerConfig, sphere_logging_callback``.
Module paths from before the rooms (``megatron_sso.mcore.factory``, ``.config``, ...) still import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Callable, Mapping


def lazy_face(package: str, table: Mapping[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a room's face: ``table`` maps a module of
    ``package`` to the names it provides; a name is imported from its module on first use, so
    importing a face costs nothing (the CLI checks its input before any slow import)."""
    where = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__


FACE = {
    "optimizers": ("install", "SSOOptimizerConfig", "sphere_config_from"),
    "observe": ("sphere_logging_callback", "spectra_logging_callback", "monitor_environment"),
    "cpu": ("enable_cpu_mode",),
    "bridge": ("TinyGPTSpec", "run_pretrain"),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)

MOVED = {
    "sphere_optimizer": "optimizers.sphere_optimizer", "spectra_optimizer": "optimizers.spectra_optimizer",
    "chain": "optimizers.chain", "factory": "optimizers.factory", "spectra_factory": "optimizers.spectra_factory",
    "config": "optimizers.config", "layouts": "optimizers.layouts",
    "tp_modules": "optimizers.tp_modules", "dp_shard": "optimizers.dp_shard", "mup_init": "optimizers.mup_init",
    "monitoring": "observe.monitoring", "sphere_logging": "observe.sphere_logging",
    "spectra_logging": "observe.spectra_logging", "cpu_mode": "cpu.mode", "cpu_devices": "cpu.devices",
    "cpu_megatron_patches": "cpu.megatron_patches", "import_hooks": "cpu.import_hooks",
    "bridge_runner": "bridge.runner", "layer_specs": "bridge.layer_specs",
    "megatron_lm_args": "megatron_lm.args", "megatron_lm_hooks": "megatron_lm.hooks",
    "cpu_mode_megatron_lm": "megatron_lm.cpu_mode",
}
"""Flat module names from before the rooms (v0.1 docs and recipes name them, e.g. a YAML's
``_target_: megatron_sso.mcore.config.SSOOptimizerConfig``) -> their module now."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import megatron_sso.mcore.<old>`` return the moved module itself (one object, so
    patches and ``isinstance`` checks see the same classes), keeping the module's own spec."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import system has just set the alias spec on the real module: put its own back
        module.__spec__ = self._specs.pop(module.__spec__.name)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
