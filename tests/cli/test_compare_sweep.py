"""The comparison's lr x radius-scaler sweep and seed handling, with the training run replaced by a
known loss surface (no Megatron, no subprocess): edge extension, the c-scaled grids, the best
(lr, c) pick, one final run per seed, and the report's seed-spread wording."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from compare import report, runs  # noqa: E402


def _surface(opt, lr, c, seed):
    """Loss with its minimum at lr = 0.2 * c (SSO: same relative step) and a best c of 2, plus a
    seed offset; Muon-Hyperball's minimum does not move with c."""
    best = 0.2 * c if opt in runs.LR_FOLLOWS_C else 0.03
    return 1.0 + math.log(lr / best) ** 2 + 0.1 * math.log(c / 2.0) ** 2 + 0.001 * (seed - 1)


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def train(args, config, data, opt, lr, steps, eval_interval, tag, c=None, seed=None):
        seed = args.seeds[0] if seed is None else seed
        calls.append((tag, opt, round(lr, 12), c, seed))
        val = _surface(opt, lr, 1.0 if c is None else c, seed)
        return runs.Run(lr, [{"kind": "val", "step": steps, "loss": val}], 0.0, c, seed)

    monkeypatch.setattr(runs, "train", train)
    return calls


def _args(**kw):
    base = dict(lrs="", sweep_lrs="", cs="", sweep=True, sweep_extend=2, sweep_steps=5, steps=10, eval_interval=5,
                radius_scalers=[1.0, 2.0, 4.0], seeds=[1, 2])
    base.update(kw)
    return SimpleNamespace(**base)


def test_sphere_entry_sweeps_lr_times_c_extends_edges_and_repeats_seeds(fake):
    out, sweep, skipped = runs.run_model(_args(sweep_lrs="sso=0.02/0.05/0.1"), "dense", "cfg", "data", ["sso"])
    assert not skipped
    per_c = sweep["sso"]
    assert sorted(per_c) == [1.0, 2.0, 4.0]
    # c = 1: the grid 0.02-0.1 holds its best at the top edge: extended twice by the outer ratio (2x)
    assert [lr for lr, _ in per_c[1.0]] == pytest.approx([0.02, 0.05, 0.1, 0.2, 0.4])
    # c = 4: the grid is multiplied by c (0.08-0.4) and the best (0.8) lies beyond two extensions
    assert [lr for lr, _ in per_c[4.0]] == pytest.approx([0.08, 0.2, 0.4, 0.8, 1.6])
    best = out["sso"]
    assert best.c == 2.0 and best.lr == pytest.approx(0.4)  # the surface's minimum, found on the grid
    finals = [call for call in fake if call[0] == "dense/final"]
    assert [(c, seed) for _, _, _, c, seed in finals] == [(2.0, 1), (2.0, 2)]
    assert best.finals == pytest.approx([1.0, 1.001]) and best.spread == pytest.approx(0.001)


def test_hyperball_grid_does_not_follow_c_and_plain_entries_have_no_c(fake):
    out, sweep, _ = runs.run_model(_args(sweep_lrs="muon_hyperball=0.01/0.03/0.1,adam=1e-3/3e-3",
                                         radius_scalers=[1.0, 2.0]), "dense", "cfg", "data",
                                   ["muon_hyperball", "adam"])
    assert [lr for lr, _ in sweep["muon_hyperball"][2.0]] == pytest.approx([0.01, 0.03, 0.1])
    assert out["muon_hyperball"].lr == pytest.approx(0.03)
    assert list(sweep["adam"]) == [None] and out["adam"].c is None
    assert all(c is None for _, opt, _, c, _ in fake if opt == "adam")


def test_fixed_lr_and_c_skip_the_sweep(fake):
    out, sweep, _ = runs.run_model(_args(lrs="sso=0.3", cs="sso=4"), "moe", "cfg", "data", ["sso"])
    assert sweep == {} and (out["sso"].lr, out["sso"].c) == (0.3, 4.0)
    assert [(t, c) for t, _, _, c, _ in fake] == [("moe/final", 4.0), ("moe/final", 4.0)]


def test_report_says_when_a_difference_is_inside_the_seed_spread():
    def run(*vals):
        first, *rest = [runs.Run(0.1, [{"kind": "val", "step": 1, "loss": v}], 0.0, None, i) for i, v in enumerate(vals)]
        first.repeats = rest
        return first

    assert "inside the seed spread" in report._versus(run(1.00, 1.02), run(1.01, 1.015))
    assert "outside the seed spread" in report._versus(run(1.00, 1.001), run(1.05, 1.051))
    assert report._seeds(run(1.0, 1.02)) == "1.0100 (1.0000, 1.0200)"
