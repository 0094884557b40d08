"""Megatron-LM's own ``pretrain_gpt.py`` with ``--optimizer sso | muon_sphere`` on CPU, through
the launcher ``python -m megatron_sso.megatron_lm`` (tiny GPT, mock data, 3 iterations, gloo).

Needs a Megatron-LM checkout at tag core_v0.16.1 in ``MEGATRON_LM_DIR`` (skipped otherwise)
with its dataset helpers built (``make -C megatron/core/datasets``, needs pybind11). How a run
is checked: :mod:`tests.megatron_lm.mlm_runs`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.megatron_lm.mlm_runs import (ROOT, assert_on_sphere, check_run, doc_cluster_args, env, launch, skip_reason,
                                       spectral_report)

pytestmark = [
    pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "checkout present"),
    pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU runs (gloo)"),
    pytest.mark.megatron,
]


def test_sso_two_ranks_reaches_the_sphere_of_the_given_radius(tmp_path):
    proc = launch(2, "--optimizer", "sso", "--sso-lambda-tol", "1e-4", "--sso-radius-scaler", "2.0",
                  "--save", str(tmp_path / "ckpt"))
    check_run(proc, "sso", 2)
    report = spectral_report(tmp_path / "ckpt")
    assert (report["optimizer"], report["lambda_tol"], report["radius_scaler"], report["iteration"]) == \
        ("sso", 1e-4, 2.0, 3)
    assert_on_sphere(report)


def test_muon_sphere_one_rank_default_radius(tmp_path):
    proc = launch(1, "--optimizer", "muon_sphere", "--save", str(tmp_path / "ckpt"))
    check_run(proc, "muon_sphere", 1)
    report = spectral_report(tmp_path / "ckpt")
    assert (report["optimizer"], report["radius_scaler"]) == ("muon_sphere", 1.0)
    assert_on_sphere(report)


def test_bad_sso_value_stops_before_the_model_and_the_doc_command_parses(tmp_path):
    """The docs' 1.7B command line, with one bad ``--sso-*`` value: Megatron-LM's parser accepts
    every flag of it (an unknown one would exit 2 with argparse's usage), then our check stops
    the run with one line before ``torch.distributed`` or the model is set up."""
    args = doc_cluster_args()
    assert args[args.index("--optimizer") + 1] == "sso"
    proc = subprocess.run([sys.executable, "-m", "megatron_sso.megatron_lm", *args, "--sso-tp-mode", "sharded"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env())
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("megatron_sso: sso_tp_mode='sharded' is not available"), last
    assert "Traceback" not in proc.stderr and "initializing torch distributed" not in proc.stdout
