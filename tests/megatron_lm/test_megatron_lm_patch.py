"""``patches/megatron-lm-core_v0.16.1-sso.patch``: well-formed, pointing at names megatron_sso
has, applying to the checkout in ``MEGATRON_LM_DIR``, and the patched tree training with SSO and
with SPECTRA (``--optimizer adam --spectra-post-clip``).

The patched-tree run uses no launcher hook: only CPU mode (to run on a CPU), so the optimizer
wiring it shows is the patch's own.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.megatron_lm.mlm_runs import (MLM, assert_on_sphere, check_run, check_spectra_built, finished_log, launch,
                                       skip_reason, spectral_report)

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.16.1-sso.patch"
FILES = ("megatron/training/arguments.py", "megatron/training/training.py")
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_patch(text: str) -> dict[str, list[tuple[int, int, list[str]]]]:
    """``{path: [(old_count, new_count, body lines), ...]}``; raises AssertionError when a header
    or a hunk's line counts are inconsistent."""
    files: dict[str, list] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            a, b = line.split()[2:4]
            assert a[2:] == b[2:] and a.startswith("a/") and b.startswith("b/"), line
            path = a[2:]
            while not lines[i].startswith("--- "):
                i += 1
            assert lines[i] == f"--- a/{path}" and lines[i + 1] == f"+++ b/{path}", lines[i:i + 2]
            files[path] = []
            i += 2
            continue
        m = HUNK.match(line)
        assert m, f"line {i + 1}: expected a hunk header, got {line!r}"
        old, new = int(m.group(2) or 1), int(m.group(4) or 1)
        body, seen_old, seen_new = [], 0, 0
        i += 1
        while i < len(lines) and (seen_old < old or seen_new < new):
            body_line = lines[i]
            assert body_line[:1] in (" ", "+", "-") or body_line == "", f"line {i + 1}: {body_line!r}"
            seen_old += body_line[:1] in (" ", "-", "")
            seen_new += body_line[:1] in (" ", "+", "")
            body.append(body_line)
            i += 1
        assert (seen_old, seen_new) == (old, new), f"hunk {line!r}: counted {seen_old}/{seen_new}"
        files[path].append((old, new, body))
    return files


def test_patch_is_well_formed_and_touches_only_megatron_training():
    files = parse_patch(PATCH.read_text())
    assert tuple(sorted(files)) == FILES
    assert all(files[f] for f in FILES)


def test_patch_calls_names_that_exist():
    added = "\n".join(line[1:] for hunks in parse_patch(PATCH.read_text()).values()
                      for _, _, body in hunks for line in body if line.startswith("+"))
    imports = re.findall(r"from (megatron_sso[\w.]*) import ([\w, ]+)", added)
    assert {module for module, _ in imports} == {"megatron_sso.mcore.megatron_lm.args"}
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"
    assert "'sso', 'muon_sphere'" in added and "'signum', 'ademamix'" in added  # added to --optimizer, routed


needs_checkout = pytest.mark.skipif(not MLM, reason="MEGATRON_LM_DIR is not set (a Megatron-LM checkout at "
                                    "tag core_v0.16.1, docs/megatron.md)")


@needs_checkout
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_patch_applies_to_the_checkout(tmp_path):
    tree = tmp_path / "tree"
    for f in FILES:  # a copy: the checkout itself may already carry the patch
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(MLM) / f, tree / f)
    proc = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        reverse = subprocess.run(["git", "apply", "--check", "--reverse", str(PATCH)], cwd=tree,
                                 capture_output=True, text=True)
        assert reverse.returncode == 0, f"does not apply to MEGATRON_LM_DIR={MLM}:\n{proc.stderr}"
        pytest.skip(f"MEGATRON_LM_DIR={MLM} already carries the patch")


RUNNER = textwrap.dedent("""
    import os, runpy, sys
    from megatron_sso.mcore.megatron_lm.cpu_mode import enable_megatron_lm_cpu_mode
    enable_megatron_lm_cpu_mode()  # CPU only: the optimizer wiring is the patched tree's own
    script = sys.argv[1]
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


@needs_checkout
@pytest.mark.skipif(bool(skip_reason()) or shutil.which("git") is None,
                    reason=skip_reason() or "git is not installed")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU run (gloo)")
@pytest.mark.megatron
def test_patched_tree_trains_with_sso_and_spectra(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(MLM, tree, ignore=shutil.ignore_patterns(".git", "tests", "docs", "examples", "images",
                                                              "__pycache__"))
    proc = subprocess.run(["git", "apply", str(PATCH)], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"MEGATRON_LM_DIR={MLM} does not take the patch (already patched?): {proc.stderr.strip()}")
    runner = tmp_path / "run_patched.py"
    runner.write_text(RUNNER)
    run = launch(1, "--optimizer", "sso", "--sso-radius-scaler", "0.5", "--save", str(tmp_path / "ckpt"),
                 entry=(str(runner), str(tree / "pretrain_gpt.py")))
    check_run(run, "sso", 1)
    report = spectral_report(tmp_path / "ckpt")
    assert (report["optimizer"], report["radius_scaler"]) == ("sso", 0.5)
    assert_on_sphere(report)
    spectra = launch(1, "--optimizer", "adam", "--spectra-post-clip", "2.0",
                     entry=(str(runner), str(tree / "pretrain_gpt.py")))  # adam with a clip: SPECTRA's builder
    check_spectra_built(finished_log(spectra), "adam", 2.0)
