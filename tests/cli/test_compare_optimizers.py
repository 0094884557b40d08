"""``scripts/compare_optimizers.py`` end to end at a minimal size (2 optimizers, 3 steps).

Why: the comparison is the project's evidence; this keeps the whole chain -- prepare-data,
``megatron-sso pretrain`` with the monitoring callback, CSV, plots, report -- from silently
breaking. It runs in a subprocess (Bridge must not be imported in pytest's process) and skips
without the Megatron stack or matplotlib.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.needs import MEGATRON, needs

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [needs(*MEGATRON, "matplotlib"),
              pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU runs"),
              pytest.mark.megatron]


def test_compare_two_optimizers_minimal(tmp_path):
    # 2 MB of the standard library's sources: enough documents that Megatron's validation split
    # is not empty (with a handful of tiny files it is, and the eval never gets a batch).
    corpus = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_optimizers.py"), "--optimizers", "adam,sso",
           "--corpus", str(corpus), "--max-bytes", "2000000", "--steps", "3", "--eval-interval", "3",
           "--eval-iters", "1", "--monitor-interval", "2", "--lrs", "adam=1e-2,sso=2e-2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["optimizer"] for r in rows} == {"adam", "sso"}
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train) == 6 and val, rows
    assert all(math.isfinite(x) for x in train + val)
    sso_sigma = [float(r["sigma_over_R/linear_proj/max"]) for r in rows
                 if r["optimizer"] == "sso" and r.get("sigma_over_R/linear_proj/max")]
    assert sso_sigma and all(abs(s - 1) < 1e-3 for s in sso_sigma[1:]), sso_sigma  # on the sphere
    for png in ("loss.png", "spectral_norm.png", "activation_rms.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert "| SSO |" in (out / "results.md").read_text()
