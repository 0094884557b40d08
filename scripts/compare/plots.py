"""PNG plots of one model's comparison (matplotlib, Agg backend, dpi 80: small files for the repo).

Per model ``M`` (``dense`` / ``moe``): ``M_loss.png`` (validation and smoothed train loss),
``M_spectral_norm.png`` (max ``sigma / R`` per atomic module kind), ``M_activations.png`` (RMS
and max-abs of the attention and MLP outputs, max over layers) and, for MoE, ``M_maxvio.png``
(router MaxVio per MoE layer).
"""

from __future__ import annotations

import math
from pathlib import Path

from .runs import LABELS
from .tables import maxvio, series

KIND_ORDER = ("qkv_q", "qkv_k", "qkv_v", "linear_proj", "gate", "up", "linear_fc2", "expert_gate", "expert_up",
              "expert_linear_fc2", "shared_gate", "shared_up", "shared_linear_fc2")
"""Display order of the atomic module kinds of :func:`megatron_sso.mcore.optimizers.layouts.param_layout`."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _label(opt: str, run=None) -> str:
    return LABELS.get(opt, opt) + (f" (lr {run.lr:g})" if run is not None else "")


def _grid(plt, n: int, cols: int = 4, w: float = 3.0, h: float = 2.6):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def plot_model(model: str, runs: dict, outdir: Path) -> list[Path]:
    """Every plot of one model's runs (``{opt: Run}``) into ``outdir``; returns the paths."""
    plt = _plt()
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for opt, run in runs.items():
        x, y = series(run.recs, "val", "loss")
        axes[0].plot(x, y, marker="o", ms=3, label=_label(opt, run))
        x, y = series(run.recs, "train", "loss")
        k = 10
        axes[1].plot(x, [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))],
                     label=_label(opt))
    axes[0].set(title=f"{model}: validation loss", xlabel="step", ylabel="loss")
    axes[1].set(title=f"{model}: train loss (10-step mean)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
    axes[0].legend(fontsize=8)
    paths.append(_save(plt, fig, outdir / f"{model}_loss.png"))

    found = {k.split("/")[1] for run in runs.values() for r in run.recs for k in r if k.startswith("sigma_over_R/")}
    kinds = [k for k in KIND_ORDER if k in found] + sorted(found - set(KIND_ORDER))
    if kinds:
        fig, axes = _grid(plt, len(kinds))
        for ax, kind in zip(axes, kinds):
            for opt, run in runs.items():
                ax.plot(*series(run.recs, "train", f"sigma_over_R/{kind}/max"), label=_label(opt))
            ax.set(title=f"{kind}: max sigma/R", xlabel="step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths.append(_save(plt, fig, outdir / f"{model}_spectral_norm.png"))

    if any(k.startswith("act_rms/") for run in runs.values() for r in run.recs for k in r):
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
        for row, (metric, what) in enumerate((("act_rms", "RMS"), ("act_maxabs", "max |.|"))):
            for col, block in enumerate(("attn", "mlp")):
                ax = axes[row][col]
                for opt, run in runs.items():
                    xs, ys = [], []
                    for r in run.recs:
                        vals = [v for k, v in r.items() if k.startswith(metric + "/") and k.endswith(block)]
                        if vals:
                            xs.append(r["step"])
                            ys.append(max(vals))
                    ax.plot(xs, ys, label=_label(opt))
                ax.set(title=f"{model}: {block} output {what} (max over layers)", xlabel="step")
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        paths.append(_save(plt, fig, outdir / f"{model}_activations.png"))

    layers = sorted({k for run in runs.values() for r in run.recs for k in r if k.startswith("maxvio/")})
    if layers:
        fig, axes = _grid(plt, len(layers) + (len(layers) > 1), cols=3, w=3.6, h=2.8)
        panels = [(ax, lambda r, key=key: r.get(key), key.split("/", 1)[1]) for ax, key in zip(axes, layers)]
        if len(layers) > 1:
            panels.append((axes[-1], maxvio, "mean over layers"))
        for ax, get, title in panels:
            for opt, run in runs.items():
                pts = [(r["step"], get(r)) for r in run.recs if r["kind"] == "train" and get(r) is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=_label(opt))
            layer = title[0].isdigit()
            ax.set(title=f"{model}: router MaxVio, {'layer ' if layer else ''}{title}", xlabel="step")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths.append(_save(plt, fig, outdir / f"{model}_maxvio.png"))
    return paths


def plot_sweep(model: str, sweep: dict, outdir: Path) -> list[Path]:
    """``M_sweep.png``: per swept sphere entry a heat map of the sweep's final validation loss over
    lr (columns, the union of every c's grid) x radius scaler c (rows); blank where not run, the best
    cell outlined. ``sweep`` is ``{opt: {c: [(lr, val)]}}``; entries without a radius are left out."""
    entries = [(o, per_c) for o, per_c in sweep.items() if any(c is not None for c in per_c)]
    if not entries:
        return []
    plt = _plt()
    outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = _grid(plt, len(entries), cols=3, w=4.6, h=3.0)
    for ax, (opt, per_c) in zip(axes, entries):
        cs = sorted(per_c)
        lrs = sorted({lr for res in per_c.values() for lr, _ in res})
        grid = [[math.nan] * len(lrs) for _ in cs]
        for i, c in enumerate(cs):
            for lr, val in per_c[c]:
                grid[i][lrs.index(lr)] = val if math.isfinite(val) else math.nan
        finite = [v for row in grid for v in row if v == v]
        im = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="lower",
                       vmin=min(finite, default=0.0), vmax=max(finite, default=1.0))
        if finite:
            bi, bj = min(((i, j) for i in range(len(cs)) for j in range(len(lrs)) if grid[i][j] == grid[i][j]),
                         key=lambda ij: grid[ij[0]][ij[1]])
            ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        for i in range(len(cs)):
            for j in range(len(lrs)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.3f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(cs)), [f"{c:g}" for c in cs])
        ax.set(title=f"{model}: {_label(opt)} sweep val loss", xlabel="lr", ylabel="radius scaler c")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return [_save(plt, fig, outdir / f"{model}_sweep.png")]
