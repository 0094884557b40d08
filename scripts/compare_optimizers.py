#!/usr/bin/env python
"""Compare AdamW, Muon, MuonSphere and SSO on the same tiny model, tokens and seed.

Why this script: the paper's claim (SPEC §7: SSO < MuonSphere < Muon < AdamW in final validation
loss, SSO reaching AdamW's final loss in fewer steps, bounded spectral norms) needs evidence from
*this* implementation, produced the same way for every optimizer. Every run goes through the real
``megatron-sso pretrain`` CLI (Megatron-Bridge's ``pretrain()``) in its own process -- Megatron keeps
process-wide state, so one process per run is the robust choice -- with
``MEGATRON_SSO_MONITOR`` set, so :mod:`megatron_sso.mcore.monitoring` records train / validation
loss, ``sigma / R`` per atomic module kind, update RMS and activation RMS to JSON lines.

Steps: (1) ``prepare-data`` on the Python standard library's ``*.py`` sources (unless
``--data-path``); (2) optionally ``--sweep``: each optimizer at each of a few learning rates for
``--sweep-steps`` steps, keeping the lowest final validation loss (a fair comparison needs each
optimizer at its own good lr); (3) one full run per optimizer; (4) ``compare.csv``, PNG plots and a
Markdown report with the measured table. Nothing is tuned towards the paper's ordering.

Example (about 12 minutes on 2 CPU cores)::

    python scripts/compare_optimizers.py --sweep --steps 500 --out runs/compare \\
        --plots-dir docs/results --report docs/results.md
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "muon", "muon_sphere", "sso")
LABELS = {"adam": "AdamW", "muon": "Muon", "muon_sphere": "MuonSphere", "sso": "SSO"}
SWEEP = {"adam": (3e-3, 1e-2, 3e-2), "muon": (1e-2, 2e-2, 5e-2),
         "muon_sphere": (1e-2, 2e-2, 5e-2), "sso": (1e-2, 2e-2, 5e-2)}
KINDS = ("qkv_q", "qkv_k", "qkv_v", "linear_proj", "gate", "up", "linear_fc2")


def parse_lrs(text: str, many: bool = False) -> dict:
    """``adam=1e-2,sso=2e-2`` -> {name: float}; with ``many``: ``adam=1e-3/3e-3`` -> {name: (..)}."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, _, value = item.partition("=")
        vals = tuple(float(v) for v in value.split("/"))
        out[name.strip()] = vals if many else vals[0]
    return out


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


def train(args, data: str, opt: str, lr: float, steps: int, eval_interval: int, tag: str) -> list[dict]:
    """One ``megatron-sso pretrain`` run; returns its monitoring records (raises on failure)."""
    rundir = Path(args.out) / tag
    rundir.mkdir(parents=True, exist_ok=True)
    log = rundir / f"{opt}_lr{lr:g}.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MEGATRON_SSO_MONITOR": str(log),
           "MEGATRON_SSO_MONITOR_INTERVAL": str(args.monitor_interval),
           "MEGATRON_SSO_MONITOR_ACTIVATIONS": "1" if args.activations else "0"}
    overrides = [f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}", f"train.train_iters={steps}",
                 f"train.eval_interval={eval_interval}", f"train.eval_iters={args.eval_iters}",
                 f"scheduler.lr_warmup_iters={min(args.warmup, max(steps // 5, 1))}",
                 f"rng.seed={args.seed}", f"dataset.random_seed={args.seed}", *args.override]
    cmd = [sys.executable, "-m", "megatron_sso", "pretrain", "--config", args.config, "--optimizer", opt,
           "--data-path", data, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    (rundir / f"{opt}_lr{lr:g}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{opt} lr {lr:g} failed (exit {proc.returncode}):\n{tail}")
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    val = [r["loss"] for r in recs if r["kind"] == "val"]
    print(f"[{tag}] {opt:12s} lr {lr:<8g} final val {val[-1] if val else float('nan'):.4f}  "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return recs


def final_val(recs: list[dict]) -> float:
    """The validation loss of the last evaluation at the last training step (Bridge evaluates
    at ``eval_interval`` and once more after training; the later one wins)."""
    vals = [r for r in recs if r["kind"] == "val"]
    return vals[-1]["loss"] if vals else float("nan")


def write_csv(path: Path, runs: dict) -> None:
    """One row per (optimizer, step): train loss, validation loss (where evaluated), monitors."""
    rows, keys = [], []
    for opt, (lr, recs) in runs.items():
        by_step: dict[int, dict] = {}
        for r in recs:
            row = by_step.setdefault(r["step"], {"optimizer": opt, "lr": lr, "step": r["step"]})
            if r["kind"] == "val":
                row["val_loss"] = r["loss"]
            else:
                row.update({{"loss": "train_loss", "lr": "lr_now"}.get(k, k): v for k, v in r.items() if k not in ("kind", "step")})
        for step in sorted(by_step):
            rows.append(by_step[step])
            keys += [k for k in by_step[step] if k not in keys]
    first = ["optimizer", "lr", "step", "tokens", "train_loss", "val_loss", "lr_now", "step_s"]
    keys = [k for k in first if k in keys] + sorted(k for k in keys if k not in first)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _series(recs, kind, key):
    pts = [(r["step"], r[key]) for r in recs if r["kind"] == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: dict, outdir: Path) -> list[Path]:
    """Validation / train loss, sigma/R per kind, activation RMS; small PNGs (dpi 80)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for opt, (lr, recs) in runs.items():
        x, y = _series(recs, "val", "loss")
        axes[0].plot(x, y, marker="o", ms=3, label=f"{LABELS.get(opt, opt)} (lr {lr:g})")
        x, y = _series(recs, "train", "loss")
        k = 10
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        axes[1].plot(x, smooth, label=LABELS.get(opt, opt))
    axes[0].set(title="validation loss", xlabel="step", ylabel="loss")
    axes[1].set(title="train loss (10-step mean)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
    axes[0].legend(fontsize=8)
    paths.append(_save(fig, outdir / "loss.png"))

    kinds = [k for k in KINDS if any(f"sigma_over_R/{k}/mean" in r for _, recs in runs.values() for r in recs)]
    if kinds:
        cols = min(4, len(kinds))
        fig, axes = plt.subplots(math.ceil(len(kinds) / cols), cols, figsize=(3 * cols, 2.6 * math.ceil(len(kinds) / cols)),
                                 squeeze=False)
        for ax, kind in zip(axes.flat, kinds):
            for opt, (_, recs) in runs.items():
                x, y = _series(recs, "train", f"sigma_over_R/{kind}/max")
                ax.plot(x, y, label=LABELS.get(opt, opt))
            ax.set(title=f"{kind}: max sigma/R", xlabel="step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(kinds):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        paths.append(_save(fig, outdir / "spectral_norm.png"))

    act = sorted({k for _, recs in runs.values() for r in recs for k in r if k.startswith("act_rms/")})
    if act:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, block in zip(axes, ("attn", "mlp")):
            for opt, (_, recs) in runs.items():
                xs, ys = [], []
                for r in recs:
                    vals = [r[k] for k in act if k.endswith(block) and k in r]
                    if vals:
                        xs.append(r["step"])
                        ys.append(max(vals))
                ax.plot(xs, ys, label=LABELS.get(opt, opt))
            ax.set(title=f"{block} output RMS (max over layers)", xlabel="step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        paths.append(_save(fig, outdir / "activation_rms.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    __import__("matplotlib.pyplot").pyplot.close(fig)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def table(runs: dict) -> tuple[list[str], dict]:
    """Markdown rows: final val loss, first evaluated step at or below AdamW's final val loss, tokens/s."""
    target = final_val(runs["adam"][1]) if "adam" in runs else None
    rows, finals = [], {}
    for opt, (lr, recs) in runs.items():
        finals[opt] = final_val(recs)
        reach = "-"
        if target is not None:
            hit = [r["step"] for r in recs if r["kind"] == "val" and r["loss"] <= target]
            reach = str(min(hit)) if hit else "not reached"
        times = [r["step_s"] for r in recs if r["kind"] == "train"][5:] or [float("nan")]
        tok = recs[0]["tokens"] if recs else 0  # tokens of one step (step 1)
        rows.append(f"| {LABELS.get(opt, opt)} | {lr:g} | {finals[opt]:.4f} | {reach} | "
                    f"{tok / statistics.median(times):,.0f} |")
    return rows, finals


def report(path: Path, args, runs: dict, chosen: dict, sweep: dict, plots: list[Path], command: str) -> None:
    rows, finals = table(runs)
    order = sorted(finals, key=finals.get)
    paper = [o for o in ("sso", "muon_sphere", "muon", "adam") if o in finals]
    verdict = ("reproduces" if order == paper else "does NOT reproduce") + " the paper's ordering " + \
        " < ".join(LABELS[o] for o in paper) + f" (measured: {' < '.join(LABELS.get(o, o) for o in order)})"
    lines = ["# Optimizer comparison (tiny dense model, CPU)", "",
             f"Machine: {machine()}.", "",
             f"Command: `{command}`", "",
             f"Model `{args.config}`; {args.steps} steps, same data (Python stdlib `*.py`, byte-level), same seed "
             f"{args.seed}; validation every {args.eval_interval} steps over {args.eval_iters} batches (Bridge's eval "
             "on the 2% validation split).", "",
             "| optimizer | lr | final val loss | first eval step <= AdamW final val | tokens/s (median) |",
             "|---|---|---|---|---|", *rows, "",
             f"At this scale the result {verdict}.", ""]
    if sweep:
        lines += ["Learning-rate sweep (final validation loss after "
                  f"{args.sweep_steps} steps; the best was kept):", "",
                  "| optimizer | " + " | ".join("lr / val" for _ in range(max(len(v) for v in sweep.values()))) + " |",
                  "|---|" + "---|" * max(len(v) for v in sweep.values())]
        for opt, res in sweep.items():
            lines.append(f"| {LABELS.get(opt, opt)} | " + " | ".join(f"{lr:g} / {v:.4f}" for lr, v in res) + " |")
        lines.append("")
    lines += ["Plots: " + ", ".join(f"[{p.name}](results/{p.name})" for p in plots), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_dense_cpu.yaml")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of megatron-sso optimizers")
    p.add_argument("--data-path", default=None, help="existing prepare-data prefix (default: stdlib sources)")
    p.add_argument("--corpus", default=None, help="text folder for prepare-data (default: Python's stdlib)")
    p.add_argument("--max-bytes", type=int, default=8_000_000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lrs", default="", help="fixed lrs, e.g. adam=1e-2,sso=2e-2 (default: the recipe's / the sweep's)")
    p.add_argument("--sweep", action="store_true", help="try --sweep-lrs per optimizer on short runs, keep the best")
    p.add_argument("--sweep-lrs", default="", help="e.g. adam=3e-3/1e-2,sso=1e-2/2e-2 (default: a built-in grid)")
    p.add_argument("--sweep-steps", type=int, default=150)
    p.add_argument("--monitor-interval", type=int, default=10, help="steps between spectral / activation snapshots")
    p.add_argument("--no-activations", dest="activations", action="store_false")
    p.add_argument("--out", default="runs/compare", help="work folder: data, logs, compare.csv")
    p.add_argument("--plots-dir", default=None, help="PNG folder (default: OUT/plots)")
    p.add_argument("--report", default=None, help="Markdown report path (default: OUT/results.md)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    p.add_argument("--override", action="append", default=[], help="extra dotted recipe override (repeatable)")
    args = p.parse_args(argv)
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    data = prepare_data(args)
    fixed, grid = parse_lrs(args.lrs), {**SWEEP, **parse_lrs(args.sweep_lrs, many=True)}
    chosen, sweep = {}, {}
    for opt in opts:
        if opt in fixed:
            chosen[opt] = fixed[opt]
        elif args.sweep:
            res = [(lr, final_val(train(args, data, opt, lr, args.sweep_steps, args.sweep_steps, "sweep")))
                   for lr in grid.get(opt, (2e-2,))]
            sweep[opt] = res
            chosen[opt] = min(res, key=lambda t: t[1] if math.isfinite(t[1]) else math.inf)[0]
        else:
            chosen[opt] = grid.get(opt, (2e-2,))[len(grid.get(opt, (2e-2,))) // 2]
    runs = {opt: (chosen[opt], train(args, data, opt, chosen[opt], args.steps, args.eval_interval, "final"))
            for opt in opts}
    out = Path(args.out)
    write_csv(out / "compare.csv", runs)
    try:
        plots = plot(runs, Path(args.plots_dir) if args.plots_dir else out / "plots")
    except ImportError:
        print("matplotlib is not installed (pip install megatron-sso[plot]): no plots", file=sys.stderr)
        plots = []
    command = "python scripts/compare_optimizers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report(Path(args.report) if args.report else out / "results.md", args, runs, chosen, sweep, plots, command)
    print(f"wrote {out / 'compare.csv'}, {len(plots)} plots, report", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
