"""An import hook that patches modules right after they are imported, or serves stubs.

Used by :mod:`.cpu_mode` so that enabling CPU mode imports nothing heavy and works
whether Megatron is imported before or after it:

* :meth:`ImportHook.after_import` runs a patch on a module as soon as it has executed
  (at once if it is already in ``sys.modules``);
* :meth:`ImportHook.stub` makes a module name import as a stub whose attributes are
  placeholder classes that raise when instantiated (for modules that hard-import an
  optional dependency that is absent).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Callable

__all__ = ["ImportHook", "ModulePatch"]

ModulePatch = Callable[[types.ModuleType], None]


class ImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder; ``apply(patch, module)`` is how patches are run (so the
    owner can record or guard them)."""

    def __init__(self, apply: Callable[[ModulePatch, types.ModuleType], None]) -> None:
        self._apply = apply
        self.stubs: dict[str, str] = {}
        self.stub_packages: set[str] = set()
        self.pending: dict[str, list[ModulePatch]] = {}

    def install(self) -> None:
        """Put the hook first on ``sys.meta_path`` (once)."""
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def stub(self, module_name: str, why: str, package: bool = False) -> None:
        """Serve ``module_name`` as a stub; instantiating any of its names raises
        ``RuntimeError(why)``. A ``package`` stub has an empty ``__path__``: its stubbed
        submodules import, any other submodule is "not found" as if the package were absent."""
        self.stubs[module_name] = why
        if package:
            self.stub_packages.add(module_name)

    def after_import(self, module_name: str, patch: ModulePatch) -> None:
        """Run ``patch(module)`` once ``module_name`` has been imported."""
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            self._apply(patch, module)
        else:
            self.pending.setdefault(module_name, []).append(patch)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.stubs:
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(self.stubs[fullname]), origin="stub",
                                                  is_package=fullname in self.stub_packages)
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:  # let the real finders locate it, then wrap its loader
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, self)
                return spec
        return None

    def _executed(self, module: types.ModuleType) -> None:
        for patch in self.pending.pop(module.__name__, []):
            self._apply(patch, module)


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the module's pending patches."""

    def __init__(self, loader: Any, hook: ImportHook) -> None:
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook._executed(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, resource readers...
        return getattr(self._loader, name)


class _StubLoader(importlib.abc.Loader):
    def __init__(self, why: str) -> None:
        self.why = why

    def create_module(self, spec):
        return _StubModule(spec.name, self.why)

    def exec_module(self, module):
        pass


class _StubModule(types.ModuleType):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(name)
        self.__why = why

    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__") or attr.startswith("_StubModule"):
            raise AttributeError(attr)
        why = f"{self.__name__}.{attr}: {self.__why}"

        def refuse(obj: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(why)

        placeholder = type(attr, (), {"__module__": self.__name__, "__init__": refuse})
        setattr(self, attr, placeholder)
        return placeholder
