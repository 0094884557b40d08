"""The GPU check (scripts/gpu/check.sh) end to end on the CPU, so it cannot rot between GPU loans.

The dry run is the same driver, sections and Megatron-Core engine as on the GPU, on tiny sizes
(gloo, one thread): ~45 s on two busy cores. It needs megatron-core (either stack: 0.16.1 on
Python 3.11, 0.19.2 on 3.12).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.needs import needs

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "gpu" / "check.sh"
SECTIONS = {"msign", "step", "solver", "host_syncs", "throughput", "engine"}


def _run(*args: str, out: Path, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run("--cpu-dry-run", out=out)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return proc, results, out


@pytest.mark.slow
@pytest.mark.megatron
@needs("megatron.core")
def test_dry_run_passes_every_section(dry_run):
    proc, results, out = dry_run
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    broken = {n: s.get("error", s["status"])[-1500:] for n, s in results["sections"].items() if s["status"] != "ok"}
    assert not broken and set(results["sections"]) == SECTIONS, broken
    failed = [c for s in results["sections"].values() for c in s["result"]["checks"] if not c["passed"]]
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "checks passed" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.megatron
@needs("megatron.core")
def test_dry_run_trains_all_four_optimizers_through_megatron(dry_run):
    _, results, _ = dry_run
    engine = results["sections"]["engine"]["result"]
    runs = {r["optimizer"]: r for r in engine["runs"]}
    assert set(runs) == {"adam", engine["muon_name"], "muon_sphere", "sso"} and not engine["errors"]
    for r in runs.values():
        assert r["steps"] == results["settings"]["steps"] and r["skipped_steps"] == 0
        assert r["median_step_ms"] >= r["median_opt_step_ms"] > 0
    assert runs["sso"]["msign_calls_per_matrix"][1:] == [2.0] * (runs["sso"]["steps"] - 1)  # warm: lambda_evals
    assert set(runs["muon_sphere"]["msign_calls_per_matrix"]) == {1.0}
    assert runs["adam"]["lrs"] == [1e-3] and runs["sso"]["lrs"] == [5e-3]  # the scheduler set every group


def test_without_wheels_the_gpu_mode_says_what_to_do(tmp_path):
    proc = _run(out=tmp_path, timeout=60, WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 2 and "scripts/gpu/prepare.sh" in proc.stderr


def test_bad_section_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu/check.py"), "--cpu-dry-run",
                           "--sections", "msign,nope", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr


_BROKEN_SECTION = """
import sys
sys.path.insert(0, {here!r})
import correctness
def broken(*args, **kwargs):
    raise RuntimeError("msign broken on purpose")
correctness.msign_vs_svd = broken
import check
sys.exit(check.main(sys.argv[1:]))
"""


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    code = _BROKEN_SECTION.format(here=str(ROOT / "scripts" / "gpu"))
    proc = subprocess.run([sys.executable, "-c", code, "--cpu-dry-run", "--sections", "msign,throughput",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 1
    assert results["sections"]["msign"]["status"] == "error"
    assert "msign broken on purpose" in results["sections"]["msign"]["error"]
    assert results["sections"]["throughput"]["status"] == "ok"
    assert "msign: error" in (tmp_path / "results.md").read_text()


def test_a_section_past_the_budget_is_skipped(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu/check.py"), "--cpu-dry-run", "--sections",
                           "msign,engine", "--budget-s", "3", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 1 and {s["status"] for s in results["sections"].values()} == {"skipped"}
