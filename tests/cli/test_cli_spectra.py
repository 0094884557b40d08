"""``megatron-sso pretrain`` with SPECTRA: ``--optimizer adam|signum|ademamix`` and the
``--spectra-*`` flags / ``optimizer.spectra_*`` keys (needs the Megatron stack; fresh processes,
as in ``test_cli_megatron.py``). The exact per-module update bounds, resume and TP are checked
in ``tests/megatron/test_spectra_pretrain.py``; here: the command line reaches them."""

from __future__ import annotations

import math
import re

import pytest

from tests.cli.test_cli_megatron import _cli, _losses, pretrain_cases
from tests.needs import MEGATRON, needs

pytestmark = [needs(*MEGATRON), pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU runs"),
              pytest.mark.megatron]
TINY = "configs/tiny_dense_cpu.yaml"


@pytest.fixture(scope="module")
def calls() -> dict:
    """Dry-runs and input errors from one process (Megatron-Bridge imported once)."""
    cases = {
        "signum": ["--config", TINY, "--dry-run", "--optimizer", "signum", "--spectra-pre-clip", "0.1",
                   "--spectra-mode", "hard", "optimizer.spectra_post_clip=5"],
        "plain_adam": ["--config", TINY, "--dry-run", "--optimizer", "adam"],
        "negative": ["--config", TINY, "--dry-run", "--optimizer", "adam", "optimizer.spectra_post_clip=-1"],
        "wrong_type": ["--config", TINY, "--dry-run", "--optimizer", "adam", "optimizer.spectra_pre_clip=tiny"],
        "typo": ["--config", TINY, "--dry-run", "--optimizer", "adam", "optimizer.spectra_postclip=1"],
        "mode": ["--config", TINY, "--dry-run", "--optimizer", "ademamix", "optimizer.spectra_mode=medium"],
        "sso_with_clip": ["--config", TINY, "--dry-run", "--spectra-post-clip", "5"],
    }
    return pretrain_cases(cases)


def test_flags_and_keys_reach_the_config(calls):
    res = calls["signum"]
    assert res["rc"] == 0, res
    line = next(ln for ln in res["stdout"].splitlines() if ln.startswith("spectra: "))
    assert "post_clip=5.0 pre_clip=0.1 mode=hard" in line, line
    assert "optimizer: signum" in res["stdout"] and "\nsso: " not in res["stdout"]
    plain = calls["plain_adam"]
    assert plain["rc"] == 0 and "spectra: " not in plain["stdout"] and "sso: " not in plain["stdout"]


@pytest.mark.parametrize("case, pattern", [
    ("negative", r"spectra_post_clip must be null, 0 \(off\) or a positive finite number, got -1"),
    ("wrong_type", r"override 'optimizer\.spectra_pre_clip=tiny': optimizer\.spectra_pre_clip: expected float or null"),
    ("typo", r"unknown key 'optimizer\.spectra_postclip'"),
    ("mode", r"spectra_mode must be 'soft' or 'hard', got 'medium'"),
    ("sso_with_clip", r"apply to adam, signum and ademamix, not optimizer='sso'"),
])
def test_bad_spectra_values_are_one_line_errors(calls, case, pattern):
    res = calls[case]
    assert res["rc"] == 2, res
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("megatron-sso pretrain: error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_mode_flag_is_refused_by_argparse():
    proc = _cli("pretrain", "--config", TINY, "--spectra-mode", "medium")
    assert proc.returncode == 2 and "invalid choice: 'medium'" in proc.stderr


def test_tiny_adamw_with_post_clip_trains():
    proc = _cli("pretrain", "--config", TINY, "--optimizer", "adam", "--spectra-post-clip", "1.0",
                "train.train_iters=4", "train.global_batch_size=4", "train.micro_batch_size=4", "model.seq_length=64",
                "scheduler.lr_warmup_iters=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(proc.stdout)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    # per iteration: all 24 atomic modules (2 layers x 8 QKV heads/groups + proj, gate, up, fc2)
    # clipped, and the largest clipped update per unit lr at most c s = sqrt(384 / 128)
    stats = re.findall(r"spectra clipped (\d+)/(\d+) .*\|dW/lr\|2 max (\S+)", proc.stdout)
    assert len(stats) == 4, proc.stdout[-2000:]
    for clipped, total, post in stats:
        assert int(total) == 24 and int(clipped) > 0 and float(post) <= math.sqrt(3) * 1.001, stats
