"""``python -m megatron_sso.megatron_lm``: launch problems are one line and exit code 2.

No Megatron-LM needed. The import failure runs in a child process: the launcher switches on
CPU mode, which is process-wide.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sso.megatron_lm import ENV_VAR, find_script, main
from megatron_sso.mcore.megatron_lm.hooks import LaunchError

ROOT = Path(__file__).resolve().parents[2]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("environ", [{}, {ENV_VAR: ""}, {ENV_VAR: "   "}])
def test_unset_dir_is_one_line(environ, capsys):
    assert main(["--optimizer", "sso"], environ) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("megatron_sso.megatron_lm: ") and f"{ENV_VAR} is not set" in line


def test_dir_without_pretrain_gpt_is_one_line(tmp_path, capsys):
    assert main([], {ENV_VAR: str(tmp_path)}) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{ENV_VAR}={tmp_path}: no pretrain_gpt.py there" in line


def test_script_found(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert find_script({ENV_VAR: str(tmp_path)}) == (tmp_path / "pretrain_gpt.py").resolve()
    with pytest.raises(LaunchError, match="no pretrain_gpt.py"):
        find_script({ENV_VAR: str(tmp_path / "missing")})


def _training_importable() -> bool:
    try:
        return importlib.util.find_spec("megatron.training") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(_training_importable(), reason="megatron.training is importable from the environment "
                    "(megatron-core >= 0.17 ships it), so a folder without it still imports")
def test_checkout_without_megatron_training_is_one_line(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("raise SystemExit('must not run')\n")
    env = {**os.environ, ENV_VAR: str(tmp_path), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "megatron_sso.megatron_lm", "--optimizer", "sso"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert f"cannot import megatron.training from {tmp_path}" in line and "must not run" not in proc.stderr
