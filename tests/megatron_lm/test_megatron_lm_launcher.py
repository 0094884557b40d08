"""``python -m megatron_sso.megatron_lm``: which script it runs (a checkout's, or the built-in one
on the wheel's loop); launch problems are one line and exit code 2.

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
from megatron_sso.mcore.megatron_lm.launcher import choose
from megatron_sso.mcore.megatron_lm.hooks import LaunchError

ROOT = Path(__file__).resolve().parents[2]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _training_importable() -> bool:
    try:
        return importlib.util.find_spec("megatron.training") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("environ", [{}, {ENV_VAR: ""}, {ENV_VAR: "   "}])
def test_unset_dir_without_the_wheel_loop_is_one_line_naming_both_ways(environ):
    with pytest.raises(LaunchError) as err:
        choose(environ, builtin_problem="megatron-core 0.16 does not ship megatron.training")
    line = _one_line(str(err.value))
    assert f"{ENV_VAR} is not set and the built-in GPT script cannot run (megatron-core 0.16" in line
    assert "core_v0.16.1" in line and "--python 3.12" in line


def test_unset_dir_with_the_wheel_loop_picks_the_builtin_script_and_a_set_dir_wins(tmp_path):
    assert choose({ENV_VAR: " "}, builtin_problem="") is None
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert choose({ENV_VAR: str(tmp_path)}, builtin_problem="") == (tmp_path / "pretrain_gpt.py").resolve()


@pytest.mark.skipif(_training_importable(), reason="megatron.training is importable: main() would train in-process")
def test_unset_dir_is_one_line_from_main(capsys):
    assert main(["--optimizer", "sso"], {}) == 2
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


def test_builtin_script_availability_follows_the_installed_wheel():
    """3.11 stack (megatron-core 0.16.1): no megatron.training in the wheel, the reason says so;
    3.12 stack (0.19.2): available."""
    from megatron_sso.mcore.compat import release
    from megatron_sso.mcore.megatron_lm.builtin_gpt import builtin_unavailable

    problem = builtin_unavailable()
    if release("megatron-core") == (0, 19):
        assert problem == ""
    elif release("megatron-core") is not None and not _training_importable():
        assert problem.endswith("does not ship megatron.training (0.17 and later do)"), problem


def test_builtin_script_refuses_what_its_providers_do_not_build():
    from types import SimpleNamespace

    from megatron_sso.mcore.megatron_lm.gpt_providers import check_supported

    plain = dict(pipeline_model_parallel_size=1, context_parallel_size=1, mtp_num_layers=None, sft=False,
                 fim_data=False, spec=None, yaml_cfg=None, heterogeneous_layers_config_path=None,
                 experimental_attention_variant=None, dataloader_inter_document_masking=False, logits_load_dir=None)
    check_supported(SimpleNamespace(**plain))
    with pytest.raises(ValueError) as err:
        check_supported(SimpleNamespace(**{**plain, "pipeline_model_parallel_size": 2, "mtp_num_layers": 1}))
    line = _one_line(str(err.value))
    assert "--pipeline-model-parallel-size > 1, --mtp-num-layers" in line and "MEGATRON_LM_DIR" in line
