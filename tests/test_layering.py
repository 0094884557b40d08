"""Imports point one way: ops -> distributed -> optim -> mcore -> cli (SPEC §1, DEVELOPERS)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_sso"
ORDER = ["ops", "distributed", "optim", "mcore", "cli"]
LEAVES = {"testing": 2,  # testing helpers sit beside optim: they may use ops and optim only
          "megatron_lm": 4}  # the Megatron-LM launcher sits beside cli; it imports no megatron.*


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


def test_imports_point_one_way():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("").parts
        own = _layer(".".join(rel))
        if own is None:
            continue
        for mod in _imports(path):
            other = _layer(mod)
            if other is not None and other > own:
                bad.append(f"{'/'.join(rel)} imports {mod}")
            if mod.startswith("megatron.") and rel[1] not in ("mcore", "cli"):
                bad.append(f"{'/'.join(rel)} imports Megatron ({mod}); only megatron_sso.mcore may")
            if rel[1] == "ops" and mod.startswith("torch.distributed"):
                bad.append(f"{'/'.join(rel)} imports {mod}; ops is pure tensor math")
    assert not bad, "\n".join(bad)
