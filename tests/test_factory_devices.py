"""Every tensor the product makes from nothing says where it lives (issue 13 item 1's audit).

``torch.tensor(x)``, ``torch.zeros(...)``... without ``device=`` land on the host; mixed with
device tensors they broke every GPU step (``torch.stack`` refuses a mix). This walks the source
of ``megatron_sso/`` and requires ``device=`` on every call of a factory below, except the
listed host tensors, each with its reason. The runtime side is ``tests/test_meta_device.py``.
"""

import ast
from pathlib import Path

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "eye", "linspace", "logspace",
             "rand", "randn", "randint", "randperm", "scalar_tensor", "empty_strided"}
ROOT = Path(__file__).resolve().parents[1] / "megatron_sso"

HOST_ON_PURPOSE = {
    ("models/tiny_gpt.py", "batches"): "the demo's data sampler: indices into a host tensor of tokens",
    ("mcore/optimizers/mup_init.py", "spectral_mup_init_modules_"):
        "a placeholder parameter of the helper that lends its TP gather, never stepped",
    ("testing/bridge_hooks.py", "layer_check_probe"): "a test probe's input in the CPU Bridge tests",
    ("mcore/observe/sphere_logging.py", "sampled_norm_errors"):
        "host generator so TP ranks draw the same start block; moved to the weights' device",
}


def _violations():
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
            name = getattr(fn, "name", "<module>")
            for node in ast.walk(fn):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and node.func.attr in FACTORIES):
                    continue
                if any(k.arg == "device" for k in node.keywords):
                    continue
                out.append((rel, name, node.lineno, ast.unparse(node)[:80]))
    return out


def test_every_factory_call_names_its_device():
    found = {}
    for rel, name, line, text in _violations():
        found.setdefault((rel, line, text), set()).add(name)
    bad = [f"{rel}:{line} {text}" for (rel, line, text), names in sorted(found.items())
           if not any((rel, n) in HOST_ON_PURPOSE for n in names)]
    assert not bad, "factory calls without device= (add it, or list the host tensor with its reason):\n" + \
        "\n".join(bad)
