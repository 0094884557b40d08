"""Imports point one way: ops -> distributed -> optim -> mcore -> cli (SPEC §1, DEVELOPERS), and
inside ``mcore`` room to room through each room's face, in the order of :data:`ROOMS`."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megatron_sso"
ORDER = ["ops", "distributed", "optim", "mcore", "cli"]
LEAVES = {"models": 2,  # the tiny pure-torch GPT beside optim: it may use ops and optim only
          "megatron_lm": 4,  # the ``python -m megatron_sso.megatron_lm`` command beside cli
          "testing": 5}  # hooks the tests hand to Bridge ranks: may use anything, nothing uses them
ROOMS = {"compat": 0, "cpu": 0, "optimizers": 1, "observe": 2, "bridge": 3, "megatron_lm": 3}
"""mcore's rooms; a room may import a room of lower or equal rank, and only through its face."""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                found.add(".".join(base + ((node.module,) if node.module else ())))
            elif node.module:
                found.add(node.module)
    return found


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "megatron_sso" or len(parts) < 2:
        return None
    if parts[1] in ORDER:
        return ORDER.index(parts[1])
    return LEAVES.get(parts[1])


def _room(parts: tuple[str, ...] | list[str]):
    """The mcore room of a dotted path's parts, or None."""
    if len(parts) >= 3 and parts[0] == "megatron_sso" and parts[1] == "mcore":
        return parts[2]
    return None


def _product_files():
    for path in PKG.rglob("*.py"):
        yield path, path.relative_to(PKG.parent).with_suffix("").parts


def test_imports_point_one_way():
    bad = []
    for path, rel in _product_files():
        own = _layer(".".join(rel))
        if own is None:
            continue
        for mod in _imports(path):
            other = _layer(mod)
            if other is not None and other > own:
                bad.append(f"{'/'.join(rel)} imports {mod}")
            if mod.startswith("megatron.") and rel[1] not in ("mcore", "cli", "testing"):
                bad.append(f"{'/'.join(rel)} imports Megatron ({mod}); only megatron_sso.mcore may")
            if rel[1] == "ops" and mod.startswith("torch.distributed"):
                bad.append(f"{'/'.join(rel)} imports {mod}; ops is pure tensor math")
            if mod.startswith("megatron_sso.testing") and rel[1] != "testing":
                bad.append(f"{'/'.join(rel)} imports {mod}; the product never uses test hooks")
    assert not bad, "\n".join(bad)


def test_rooms_import_each_other_through_faces():
    """A room's internals are its own: other rooms, the CLI and the Megatron-LM command use the
    names its ``__init__`` exports (``megatron_sso.mcore.<room>``), never ``<room>.<module>``;
    and a room never imports a room above it (no cycles between rooms)."""
    bad = []
    for path, rel in _product_files():
        if rel[1] == "testing":
            continue
        own = _room(rel) if len(rel) > 3 else None
        for mod in _imports(path):
            parts = mod.split(".")
            other = _room(parts)
            if other is None or other == own:
                continue
            if other not in ROOMS:
                bad.append(f"{'/'.join(rel)} imports {mod}: no such room")
            elif len(parts) > 3:
                bad.append(f"{'/'.join(rel)} imports {mod}: use the face megatron_sso.mcore.{other}")
            elif own is not None and ROOMS[other] > ROOMS[own]:
                bad.append(f"{'/'.join(rel)} ({own}) imports the room above it, {other}")
    assert not bad, "\n".join(bad)


def test_no_file_in_mcore_outside_a_room():
    loose = sorted(p.name for p in (PKG / "mcore").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"files in megatron_sso/mcore/ outside a room: {loose}"
    rooms = sorted(p.name for p in (PKG / "mcore").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert rooms == sorted(ROOMS), rooms


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_face_names_exist(room):
    """Every name a face lists is defined by the module it points at (faces are lazy tables,
    so a renamed function would otherwise surface only when someone uses it)."""
    face = importlib.import_module(f"megatron_sso.mcore.{room}")
    missing = []
    for module, names in face.FACE.items():
        mod = importlib.import_module(f"megatron_sso.mcore.{room}.{module}")
        lazy = hasattr(mod, "__getattr__")  # e.g. SSOOptimizerConfig, built on first use
        missing += [f"{module}.{n}" for n in names if n not in vars(mod) and not lazy]
    assert not missing, missing
    assert sorted(face.__all__) == sorted(n for names in face.FACE.values() for n in names)


def test_faces_and_old_paths_import_no_megatron():
    """Importing every room's modules (what a face resolves to) and the pre-room module paths
    pulls in no Megatron: the CLI's checks run before the slow import. The old paths are the
    same module objects as the new ones."""
    code = """
import importlib, sys
import megatron_sso.mcore as m
for room in ("compat", "cpu", "optimizers", "observe", "bridge", "megatron_lm"):
    face = importlib.import_module(f"megatron_sso.mcore.{room}")
    for module in face.FACE:
        importlib.import_module(f"megatron_sso.mcore.{room}.{module}")
for old, new in m.MOVED.items():
    a = importlib.import_module(f"megatron_sso.mcore.{old}")
    b = importlib.import_module(f"megatron_sso.mcore.{new}")
    assert a is b and a.__spec__.name == b.__name__, (old, new, a.__spec__.name)
from megatron_sso.mcore.factory import install
from megatron_sso.mcore import install as install2
assert install is install2
heavy = sorted(k for k in sys.modules if k == "megatron" or k.startswith("megatron."))
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
