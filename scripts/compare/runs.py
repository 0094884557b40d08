"""Training runs of the comparison: one ``megatron-sso pretrain`` process per (model, optimizer, lr).

Why one process per run: Megatron keeps process-wide state (parallel groups, RNG trackers,
global buffers), so a fresh process is the only way to give every optimizer the same start.
Each run turns the monitor on through the recipe's ``monitor.*`` overrides (the same path any
user would take), so the records are those of :mod:`megatron_sso.mcore.observe.monitoring`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from .tables import final_val

ROOT = Path(__file__).resolve().parents[2]

MODELS = {"dense": "configs/tiny_dense_cpu.yaml", "moe": "configs/tiny_moe_cpu.yaml"}
"""``--model`` names and their recipes."""

OPTIMIZERS = ("adam", "muon", "muon_sphere", "sso", "muon_hyperball", "adam_spectra")
LABELS = {"adam": "AdamW", "muon": "Muon", "muon_sphere": "MuonSphere", "sso": "SSO",
          "muon_hyperball": "Muon-Hyperball", "adam_spectra": "AdamW+SPECTRA"}

SPHERES = ("muon_sphere", "sso", "muon_hyperball")
"""Entries with a radius, swept over ``radius_scaler`` c as well as lr (``optimizer.sso_radius_scaler``).
SSO / MuonSphere: ``R = c sqrt(d_out/d_in)``, the paper's Fig. 5 sweep (c = 2 best at 1.7B). Muon-Hyperball:
``R = c ||W_0||_F``."""

RADIUS_SCALERS = (1.0, 2.0, 4.0)
"""Default c grid (issue 18: at least 1, 2, 4; the paper's Fig. 5 tried 1-4)."""

LR_FOLLOWS_C = ("muon_sphere", "sso")
"""Entries whose lr grid is multiplied by c: their step is ``lr s Phi`` (``||Phi||_2 = 1``) on a weight of
norm ``c s``, so the *relative* step is lr / c and the same relative steps need c times the lr. Muon-Hyperball's
lr is already relative (the step is ``lr R`` long), so its grid does not move with c."""

CLI = {"adam_spectra": "adam", "muon": "sso_muon"}
"""Comparison entries whose ``megatron-sso`` optimizer has another name: AdamW+SPECTRA is
``--optimizer adam`` with ``optimizer.spectra_post_clip=<c>`` (SPEC §5); the ``muon`` entry is our
Muon baseline, ``--optimizer sso_muon`` (``muon`` there is Megatron's own Muon)."""

SWEEP = {"adam": (1e-3, 3e-3, 1e-2), "adam_spectra": (3e-3, 1e-2, 3e-2), "muon": (2e-2, 5e-2, 1e-1),
         "muon_sphere": (2e-2, 5e-2, 1e-1), "sso": (2e-2, 5e-2, 1e-1), "muon_hyperball": (2e-2, 5e-2, 1e-1)}
"""Default lr grids (at c = 1), one factor ~2-3 apart, centred on the first partial sweep of docs/results.md
(60 steps, dense: AdamW 3e-3 beat 1e-2; Muon's best, 5e-2, was the top of its grid; tiny models
like larger lrs than the paper's 5e-3). The same grid for the matrix optimizers: at c = 1 a sphere
module's relative step is about lr, as is Muon-Hyperball's by construction. A grid whose best lr is at
an edge is extended past it (``--sweep-extend``), so every kept lr has a worse neighbour on both sides
unless the extension budget ran out (the report says so)."""

SEEDS = (1234, 1235)
"""Default seeds of the final runs (model init and data order: ``rng.seed`` and ``dataset.random_seed``);
the sweep runs on the first."""


class Unsupported(RuntimeError):
    """This installation's ``megatron-sso pretrain`` rejects a setting an entry needs."""


@dataclass
class Run:
    """One finished training run: its lr, monitoring records and wall-clock seconds; ``c`` is the
    radius scaler (None: the entry has no radius), ``seed`` the run's seed. A final run of the
    comparison also holds the same setting's runs at the other seeds in ``repeats``."""
    lr: float
    recs: list = field(default_factory=list)
    wall_s: float = float("nan")
    c: float | None = None
    seed: int | None = None
    repeats: list = field(default_factory=list)

    @property
    def seed_runs(self) -> list:
        """This run and its repeats, first seed first."""
        return [self, *self.repeats]

    @property
    def finals(self) -> list[float]:
        """Final validation loss of every seed."""
        return [final_val(r.recs) for r in self.seed_runs]

    @property
    def mean_final(self) -> float:
        vals = self.finals
        return sum(vals) / len(vals)

    @property
    def spread(self) -> float:
        """max - min of the final validation loss over the seeds (0 for one seed)."""
        vals = self.finals
        return max(vals) - min(vals)


def parse_lrs(text: str, many: bool = False) -> dict:
    """``adam=1e-2,sso=2e-2`` -> {name: float}; with ``many``: ``adam=1e-3/3e-3`` -> {name: (..)}.
    A name may carry a model: ``moe:sso=3e-2`` applies to the MoE runs only."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"lr item {item!r} is not name=value")
        vals = tuple(float(v) for v in value.split("/"))
        out[name.strip()] = vals if many else vals[0]
    return out


def pick(table: dict, model: str, opt: str, default=None):
    """``table[f"{model}:{opt}"]``, else ``table[opt]``, else ``default``."""
    return table.get(f"{model}:{opt}", table.get(opt, default))


def prepare_data(args) -> str:
    """The data prefix: ``--data-path`` as given, or stdlib sources prepared once under ``--out``."""
    if args.data_path:
        return args.data_path
    prefix = Path(args.out) / "data" / "stdlib"
    if not Path(f"{prefix}.bin").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        corpus = args.corpus or sysconfig.get_paths()["stdlib"]
        subprocess.run([sys.executable, "-m", "megatron_sso", "prepare-data", "--input", corpus, "--include", "*.py",
                        "--max-bytes", str(args.max_bytes), "--output", str(prefix)], check=True, cwd=ROOT)
    return str(prefix)


def train(args, config: str, data: str, opt: str, lr: float, steps: int, eval_interval: int, tag: str,
          c: float | None = None, seed: int | None = None) -> Run:
    """One ``megatron-sso pretrain`` run at radius scaler ``c`` (sphere entries) and ``seed``
    (default: the first of ``--seeds``); returns its records. Raises :class:`Unsupported` when
    the CLI rejects one of the entry's settings (exit 2 naming it), RuntimeError on any other
    failure."""
    seed = args.seeds[0] if seed is None else seed
    rundir = Path(args.out) / tag
    rundir.mkdir(parents=True, exist_ok=True)
    name = f"{opt}_lr{lr:g}" + (f"_c{c:g}" if c is not None else "") + f"_s{seed}"
    log = rundir / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGATRON_SSO_MONITOR")}
    env["PYTHONWARNINGS"] = "ignore"
    extra = [f"optimizer.spectra_post_clip={args.spectra_clip}"] if opt == "adam_spectra" else []
    extra += [f"optimizer.sso_radius_scaler={c}"] if c is not None else []
    overrides = [f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}", f"train.train_iters={steps}",
                 f"train.eval_interval={eval_interval}", f"train.eval_iters={args.eval_iters}",
                 f"scheduler.lr_warmup_iters={min(args.warmup, max(steps // 5, 1))}",
                 f"rng.seed={seed}", f"dataset.random_seed={seed}",
                 f"monitor.path={log.resolve()}", f"monitor.interval={args.monitor_interval}",
                 f"monitor.activations={'true' if args.activations else 'false'}", "monitor.router=true",
                 *extra, *args.override]
    cmd = [sys.executable, "-m", "megatron_sso", "pretrain", "--config", config, "--optimizer", CLI.get(opt, opt),
           "--data-path", data, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    (rundir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [ln for ln in lines if "megatron-sso pretrain: error:" in ln]
        if proc.returncode == 2 and extra and errors and "spectra" in errors[-1]:
            raise Unsupported(errors[-1].split("error:", 1)[1].strip())
        raise RuntimeError(f"{opt} lr {lr:g} failed (exit {proc.returncode}):\n" + "\n".join(lines[-15:]))
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    where = f"lr {lr:<8g}" + (f" c {c:<4g}" if c is not None else "") + f" seed {seed}"
    print(f"[{tag}] {opt:14s} {where} final val {final_val(recs):.4f}  ({wall:.0f} s)", flush=True)
    return Run(lr, recs, wall, c, seed)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def sweep_lr(args, config: str, data: str, model: str, opt: str, grid: tuple, c: float | None) -> list:
    """Final validation loss of ``--sweep-steps`` runs over ``grid`` at radius scaler ``c``, extended
    past an edge that holds the best lr (geometrically, by the grid's outer ratio, at most
    ``--sweep-extend`` times): returns ``[(lr, final val)]`` sorted by lr."""
    res = {}
    todo = sorted(grid)
    for _ in range(args.sweep_extend + 1):
        for cand in todo:
            if cand not in res:
                r = train(args, config, data, opt, cand, args.sweep_steps, args.sweep_steps, f"{model}/sweep", c)
                res[cand] = final_val(r.recs)
        lrs = sorted(res)
        best = min(lrs, key=lambda lr: _finite(res[lr]))
        if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
            break
        if best == lrs[0]:
            todo = [lrs[0] * lrs[0] / lrs[1]]
        else:
            todo = [lrs[-1] * lrs[-1] / lrs[-2]]
    return sorted(res.items())


def run_model(args, model: str, config: str, data: str, opts: list[str]) -> tuple[dict, dict, dict]:
    """Sweep (if asked) and train every optimizer on one model. Returns ``(runs, sweep, skipped)``:
    ``{opt: Run}`` (the first seed's final run, the other seeds in ``Run.repeats``),
    ``{opt: {c: [(lr, final val)]}}`` (``c`` None for entries without a radius), ``{opt: reason}``.

    The sphere entries (:data:`SPHERES`) are swept over lr x c: per c of ``--radius-scalers`` an lr
    grid (the entry's, times c for :data:`LR_FOLLOWS_C`) extended around that c's best; the best
    (lr, c) pair is kept. A fixed ``--lrs`` value skips the sweep (at the first c unless ``--cs``
    fixes it too)."""
    fixed, grid = parse_lrs(args.lrs), {**SWEEP, **parse_lrs(args.sweep_lrs, many=True)}
    fixed_c = parse_lrs(args.cs)
    runs, sweep, skipped = {}, {}, {}
    for opt in opts:
        lrs = pick(grid, model, opt, (2e-2,))
        cs = [None]
        if opt in SPHERES:
            c0 = pick(fixed_c, model, opt)
            cs = [c0] if c0 is not None else list(args.radius_scalers)
        try:
            lr = pick(fixed, model, opt)
            c = cs[0]
            if lr is None and args.sweep and len(lrs) * len(cs) > 1:  # one candidate: nothing to choose
                sweep[opt] = {}
                for cand_c in cs:
                    scale = cand_c if (cand_c is not None and opt in LR_FOLLOWS_C) else 1.0
                    sweep[opt][cand_c] = sweep_lr(args, config, data, model, opt,
                                                  tuple(x * scale for x in lrs), cand_c)
                c, (lr, _) = min(((k, best) for k, res in sweep[opt].items()
                                  for best in [min(res, key=lambda t: _finite(t[1]))]),
                                 key=lambda kb: _finite(kb[1][1]))
            elif lr is None:
                lr = lrs[len(lrs) // 2] * (c if (c is not None and opt in LR_FOLLOWS_C) else 1.0)
            first, *rest = [train(args, config, data, opt, lr, args.steps, args.eval_interval, f"{model}/final", c,
                                  seed) for seed in args.seeds]
            first.repeats = rest
            runs[opt] = first
        except Unsupported as exc:
            skipped[opt] = str(exc)
            print(f"[skip] {model} {LABELS.get(opt, opt)}: this megatron-sso rejects a setting it needs: {exc}",
                  file=sys.stderr, flush=True)
    return runs, sweep, skipped
