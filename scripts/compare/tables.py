"""The comparison's CSV and the numbers the report quotes, all computed from the monitoring records.

Records are those of :mod:`megatron_sso.mcore.observe.monitoring`: ``{"kind": "train", "step", "loss",
"lr", "step_s", "tokens", ...}`` every step (spectral ``sigma_over_R/<kind>/{mean,max,min}``,
``update_rms/*``, ``act_rms/<layer>.<attn|mlp>``, ``act_maxabs/*`` and ``maxvio/<layer>`` on
monitored steps) and ``{"kind": "val", "step", "loss"}`` at every evaluation.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
from pathlib import Path

FIRST = ["model", "optimizer", "lr", "radius_scaler", "seed", "step", "tokens", "train_loss", "val_loss", "lr_now",
         "step_s", "step_cpu_s", "maxvio"]
"""Leading CSV columns; the per-module / per-layer columns follow, sorted."""


def maxvio(rec: dict) -> float | None:
    """Mean MaxVio over the MoE layers of one record (None when it has none)."""
    vals = [v for k, v in rec.items() if k.startswith("maxvio/") and v == v]
    return sum(vals) / len(vals) if vals else None


def write_csv(path: Path, results: dict) -> None:
    """One row per (model, optimizer, seed, step): train loss, validation loss (where evaluated),
    ``maxvio`` (mean over MoE layers, where monitored) and every monitored value; ``radius_scaler``
    is empty for entries without a radius."""
    rows, keys = [], []
    every_seed = [(model, opt, run) for model, runs in results.items() for opt, first in runs.items()
                  for run in first.seed_runs]
    for model, opt, run in every_seed:
        by_step: dict[int, dict] = {}
        for r in run.recs:
            row = by_step.setdefault(r["step"], {"model": model, "optimizer": opt, "lr": run.lr,
                                                 "radius_scaler": "" if run.c is None else run.c,
                                                 "seed": run.seed, "step": r["step"]})
            if r["kind"] == "val":
                row["val_loss"] = r["loss"]
                continue
            row.update({{"loss": "train_loss", "lr": "lr_now"}.get(k, k): v for k, v in r.items()
                        if k not in ("kind", "step")})
            if maxvio(r) is not None:
                row["maxvio"] = maxvio(r)
        for step in sorted(by_step):
            rows.append(by_step[step])
            keys += [k for k in by_step[step] if k not in keys]
    keys = [k for k in FIRST if k in keys] + sorted(k for k in keys if k not in FIRST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def series(recs: list[dict], kind: str, key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if r["kind"] == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def final_val(recs: list[dict]) -> float:
    """The validation loss of the last evaluation (Bridge evaluates at ``eval_interval`` and
    once more after training; the later one wins); NaN when there was none."""
    vals = [r["loss"] for r in recs if r["kind"] == "val"]
    return vals[-1] if vals else float("nan")


def first_step_at_or_below(recs: list[dict], target: float) -> int | None:
    """The first evaluated step whose validation loss is <= ``target`` (None: never)."""
    hit = [r["step"] for r in recs if r["kind"] == "val" and r["loss"] <= target]
    return min(hit) if hit else None


def tokens_per_s(recs: list[dict]) -> float:
    """Tokens of one step over the median step time, skipping the first 5 (warm-up) steps."""
    train = [r for r in recs if r["kind"] == "train"]
    times = [r["step_s"] for r in train[5:]] or [r["step_s"] for r in train] or [float("nan")]
    return (train[0]["tokens"] if train else 0) / statistics.median(times)


def median_step_s(recs: list[dict], key: str = "step_s") -> float:
    """Median seconds per step after the first 5 (``key`` ``step_cpu_s``: CPU seconds)."""
    times = [r[key] for r in recs if r["kind"] == "train" and key in r][5:]
    return statistics.median(times) if times else float("nan")


def tail_maxvio(recs: list[dict]) -> float:
    """Median of the mean-over-layers MaxVio over the last quarter of the monitored steps (one
    monitored step is a single batch: its MaxVio is noisy, the median of several is not)."""
    vals = [maxvio(r) for r in recs if r["kind"] == "train" and maxvio(r) is not None]
    return statistics.median(vals[-max(1, math.ceil(len(vals) / 4)):]) if vals else float("nan")


def sphere_deviation(recs: list[dict]) -> float:
    """Largest ``|sigma / R - 1|`` over every module kind and logged step."""
    devs = [abs(v - 1) for r in recs if r["kind"] == "train"
            for k, v in r.items() if k.startswith("sigma_over_R/") and not k.endswith("/mean")]
    return max(devs) if devs else float("nan")


def final_sigma_max(recs: list[dict]) -> float:
    """Largest ``sigma / R`` over the module kinds at the last logged step."""
    logged = [r for r in recs if r["kind"] == "train" and any(k.startswith("sigma_over_R/") for k in r)]
    if not logged:
        return float("nan")
    return max(v for k, v in logged[-1].items() if k.startswith("sigma_over_R/") and k.endswith("/max"))


def activation_ratios(recs: list[dict], from_step: int = 0) -> dict[str, tuple[float, float]]:
    """Per block (``<layer>.<attn|mlp>``): (max/min of its output RMS over the logged steps at or
    after ``from_step``, last/first): the issue's "bounded" (max/min <= 2) and "grows" (> 1)."""
    out = {}
    keys = sorted({k for r in recs for k in r if k.startswith("act_rms/")})
    for key in keys:
        vals = [r[key] for r in recs if r["kind"] == "train" and key in r and r["step"] >= from_step]
        if len(vals) >= 2 and min(vals) > 0:
            out[key.split("/", 1)[1]] = (max(vals) / min(vals), vals[-1] / vals[0])
    return out


def machine() -> str:
    """CPU model, core count, GPU (or none), Python and torch versions: the report's machine line."""
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
    load = ""
    if hasattr(os, "getloadavg"):
        load = f"; load average at the end {os.getloadavg()[0]:.1f}"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}{load}")
