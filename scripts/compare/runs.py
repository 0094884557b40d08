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

OPTIMIZERS = ("adam", "muon", "muon_sphere", "sso", "adam_spectra")
LABELS = {"adam": "AdamW", "muon": "Muon", "muon_sphere": "MuonSphere", "sso": "SSO",
          "adam_spectra": "AdamW+SPECTRA"}

CLI = {"adam_spectra": "adam"}
"""Comparison entries that are a ``megatron-sso`` optimizer plus settings: AdamW+SPECTRA is
``--optimizer adam`` with ``optimizer.spectra_post_clip=<c>`` (SPEC §5)."""

SWEEP = {"adam": (1e-3, 3e-3, 1e-2), "adam_spectra": (3e-3, 1e-2, 3e-2), "muon": (2e-2, 5e-2, 1e-1),
         "muon_sphere": (2e-2, 5e-2, 1e-1), "sso": (2e-2, 5e-2, 1e-1)}
"""Default lr grids, one factor ~2.5-3 apart, centred on the first partial sweep of docs/results.md
(60 steps, dense: AdamW 3e-3 beat 1e-2; Muon's best, 5e-2, was the top of its grid; tiny models
like larger lrs than the paper's 5e-3). The same grid for the three matrix optimizers."""


class Unsupported(RuntimeError):
    """This installation's ``megatron-sso pretrain`` rejects a setting an entry needs."""


@dataclass
class Run:
    """One finished training run: its lr, monitoring records and wall-clock seconds."""
    lr: float
    recs: list = field(default_factory=list)
    wall_s: float = float("nan")


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


def train(args, config: str, data: str, opt: str, lr: float, steps: int, eval_interval: int, tag: str) -> Run:
    """One ``megatron-sso pretrain`` run; returns its records. Raises :class:`Unsupported` when
    the CLI rejects one of the entry's settings (exit 2 naming it), RuntimeError on any other
    failure."""
    rundir = Path(args.out) / tag
    rundir.mkdir(parents=True, exist_ok=True)
    log = rundir / f"{opt}_lr{lr:g}.jsonl"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGATRON_SSO_MONITOR")}
    env["PYTHONWARNINGS"] = "ignore"
    extra = [f"optimizer.spectra_post_clip={args.spectra_clip}"] if opt == "adam_spectra" else []
    overrides = [f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}", f"train.train_iters={steps}",
                 f"train.eval_interval={eval_interval}", f"train.eval_iters={args.eval_iters}",
                 f"scheduler.lr_warmup_iters={min(args.warmup, max(steps // 5, 1))}",
                 f"rng.seed={args.seed}", f"dataset.random_seed={args.seed}",
                 f"monitor.path={log.resolve()}", f"monitor.interval={args.monitor_interval}",
                 f"monitor.activations={'true' if args.activations else 'false'}", "monitor.router=true",
                 *extra, *args.override]
    cmd = [sys.executable, "-m", "megatron_sso", "pretrain", "--config", config, "--optimizer", CLI.get(opt, opt),
           "--data-path", data, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    (rundir / f"{opt}_lr{lr:g}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [ln for ln in lines if "megatron-sso pretrain: error:" in ln]
        if proc.returncode == 2 and extra and errors and "spectra" in errors[-1]:
            raise Unsupported(errors[-1].split("error:", 1)[1].strip())
        raise RuntimeError(f"{opt} lr {lr:g} failed (exit {proc.returncode}):\n" + "\n".join(lines[-15:]))
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print(f"[{tag}] {opt:12s} lr {lr:<8g} final val {final_val(recs):.4f}  ({wall:.0f} s)", flush=True)
    return Run(lr, recs, wall)


def run_model(args, model: str, config: str, data: str, opts: list[str]) -> tuple[dict, dict, dict]:
    """Sweep (if asked) and train every optimizer on one model. Returns ``(runs, sweep, skipped)``:
    ``{opt: Run}``, ``{opt: [(lr, final val)]}``, ``{opt: reason}``."""
    fixed, grid = parse_lrs(args.lrs), {**SWEEP, **parse_lrs(args.sweep_lrs, many=True)}
    runs, sweep, skipped = {}, {}, {}
    for opt in opts:
        lrs = pick(grid, model, opt, (2e-2,))
        try:
            lr = pick(fixed, model, opt)
            if lr is None and args.sweep:
                res = []
                for cand in lrs:
                    r = train(args, config, data, opt, cand, args.sweep_steps, args.sweep_steps, f"{model}/sweep")
                    res.append((cand, final_val(r.recs)))
                sweep[opt] = res
                lr = min(res, key=lambda t: t[1] if math.isfinite(t[1]) else math.inf)[0]
            elif lr is None:
                lr = lrs[len(lrs) // 2]
            runs[opt] = train(args, config, data, opt, lr, args.steps, args.eval_interval, f"{model}/final")
        except Unsupported as exc:
            skipped[opt] = str(exc)
            print(f"[skip] {model} {LABELS.get(opt, opt)}: this megatron-sso rejects a setting it needs: {exc}",
                  file=sys.stderr, flush=True)
    return runs, sweep, skipped
