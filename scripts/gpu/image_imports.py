"""Make this process see only what the GPU image has: the CPU dry run's guard against an import
that would fail on the GPU machine (and waste its loan).

:func:`restrict_imports` installs a finder that refuses (``ModuleNotFoundError``, as on the image)
every module that belongs only to distributions outside ``image_packages.txt``, ``wheels.txt`` and
this project. Optional imports (megatron-core's ``multistorageclient``, ...) then take their
fallback here as they will there; a hard import of a missing package fails the dry run.
"""

from __future__ import annotations

import importlib.abc
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_distributions() -> set[str]:
    names = {"megatron-sso"}
    for f in ("image_packages.txt", "wheels.txt"):
        for line in (HERE / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.add(_norm(line))
    return names


def blocked_prefixes(allowed: set[str]) -> tuple[set[str], set[str]]:
    """(module prefixes to refuse, prefixes some allowed distribution provides). A prefix is a
    top-level module, or ``top.sub`` inside a namespace package shared with an allowed
    distribution (``megatron.bridge`` beside ``megatron.core``)."""
    provided: dict[str, set[str]] = {}
    for dist in distributions():
        name = _norm(dist.metadata["Name"] or "")
        for f in dist.files or ():
            parts = f.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__"):
                continue
            top = parts[0].removesuffix(".py").split(".")[0]
            provided.setdefault(top, set()).add(name)
            if len(parts) > 2:
                provided.setdefault(f"{top}.{parts[1].removesuffix('.py')}", set()).add(name)
    ok = {p for p, owners in provided.items() if owners & allowed}
    blocked = {p for p, owners in provided.items() if not owners & allowed}
    return blocked, ok


class _ImageOnly(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: set[str], ok: set[str]) -> None:
        self.blocked, self.ok, self.refused = blocked, ok, set()

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        for prefix in (".".join(parts[:2]), parts[0]):
            if prefix in self.ok:
                return None
            if prefix in self.blocked:
                self.refused.add(prefix)
                raise ModuleNotFoundError(f"No module named {fullname!r} (not on the GPU image)", name=fullname)
        return None


def restrict_imports() -> _ImageOnly:
    """Install the finder (first on ``sys.meta_path``); its ``refused`` set records what was refused."""
    finder = _ImageOnly(*blocked_prefixes(allowed_distributions()))
    sys.meta_path.insert(0, finder)
    return finder
