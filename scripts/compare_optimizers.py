#!/usr/bin/env python
"""Compare AdamW, Muon, MuonSphere, SSO, Muon-Hyperball (and AdamW+SPECTRA) on the same tiny models and tokens.

Why this script: the paper's claim (SPEC §7: SSO < MuonSphere < Muon < AdamW in final validation
loss, SSO reaching AdamW's final loss in fewer steps, bounded spectral norms and activations,
lower router MaxVio on MoE) needs evidence from *this* implementation, produced the same way for
every optimizer. Every run goes through the real ``megatron-sso pretrain`` CLI (Megatron-Bridge's
``pretrain()``) in its own process with the recipe's ``monitor.*`` keys set, so
:mod:`megatron_sso.mcore.observe.monitoring` records train / validation loss, ``sigma / R`` per atomic
module kind, update RMS, activation RMS and max-abs, and the MoE routers' MaxVio as JSON lines.

Steps: (1) ``prepare-data`` on the Python standard library's ``*.py`` sources (unless
``--data-path``); (2) per ``--model`` (``dense``: configs/tiny_dense_cpu.yaml, ``moe``:
configs/tiny_moe_cpu.yaml) and optimizer, optionally ``--sweep``: each lr of a small grid for
``--sweep-steps`` steps, keeping the lowest final validation loss (each optimizer at its own good
lr); the sphere entries (MuonSphere, SSO, Muon-Hyperball) over lr x radius scaler c
(``--radius-scalers``, default 1, 2, 4: the paper tuned c, Fig. 5, and c changes the relative step,
so lr and c are swept together), each c's grid extended past an edge holding its best lr;
(3) the final run of every optimizer at its best setting, once per ``--seeds`` value (default two:
the report gives the mean and both values and says when a difference is inside the seed spread);
(4) ``compare.csv`` (all models, every seed), PNG plots (with the lr x c heat maps) and a Markdown
report (:mod:`compare.report`). Nothing is tuned towards the paper's ordering. An entry whose
settings this installation does not know (AdamW+SPECTRA needs ``optimizer.spectra_post_clip``)
is skipped with a message, the rest still run.

With ``--sweep`` the defaults are the full comparison, and this one command regenerates
docs/results.md: both models, 6 entries; 3-point lr sweeps of 150 steps (3 x 3 per sphere entry,
plus edge extensions), 800-step final runs at 2 seeds: about 45-60 sweep runs and 12 final runs per
model. The 40-run version of this protocol (no c sweep, one seed) took about 18 minutes on 2 idle
CPU cores (~9 s startup per run; dense 66-98 ms and MoE 19-38 ms per step), so expect roughly
1-1.5 hours idle and several on a shared machine; ``--model``, ``--optimizers``, ``--cs`` and
``--lrs`` cut it down::

    python scripts/compare_optimizers.py --sweep --out runs/compare --plots-dir docs/results \\
        --report docs/results.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ``compare`` package beside this file

from compare import plots, report, tables  # noqa: E402
from compare.runs import (MODELS, OPTIMIZERS, RADIUS_SCALERS, SEEDS, SWEEP, parse_lrs, prepare_data,  # noqa: E402
                          run_model)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} (default: both)")
    p.add_argument("--config", default=None, help="recipe for a single --model (default: its tiny recipe)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of comparison entries")
    p.add_argument("--data-path", default=None, help="existing prepare-data prefix (default: stdlib sources)")
    p.add_argument("--corpus", default=None, help="text folder for prepare-data (default: Python's stdlib)")
    p.add_argument("--max-bytes", type=int, default=8_000_000)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma list; every final run is repeated per seed (the sweep uses the first)")
    p.add_argument("--lrs", default="", help="fixed lrs, e.g. adam=1e-2,sso=2e-2,moe:sso=3e-2 (skips their sweep)")
    p.add_argument("--sweep", action="store_true", help="try --sweep-lrs per optimizer on short runs, keep the best")
    p.add_argument("--sweep-lrs", default="", help="e.g. adam=3e-3/1e-2,moe:sso=1e-2/2e-2 (default: a built-in grid)")
    p.add_argument("--sweep-steps", type=int, default=150)
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="times a sweep grid is extended past an edge that holds its best lr")
    p.add_argument("--radius-scalers", default=",".join(f"{c:g}" for c in RADIUS_SCALERS),
                   help="radius scaler c grid of the sphere entries (MuonSphere, SSO, Muon-Hyperball)")
    p.add_argument("--cs", default="", help="fixed c per sphere entry, e.g. sso=2,moe:muon_hyperball=1 (skips the c sweep)")
    p.add_argument("--spectra-clip", type=float, default=5.0,
                   help="AdamW+SPECTRA post-clip level c (SPEC §5: 5 with a cosine schedule)")
    p.add_argument("--monitor-interval", type=int, default=10, help="steps between spectral / activation snapshots")
    p.add_argument("--no-activations", dest="activations", action="store_false")
    p.add_argument("--out", default="runs/compare", help="work folder: data, logs, compare.csv")
    p.add_argument("--plots-dir", default=None, help="PNG folder (default: OUT/plots)")
    p.add_argument("--report", default=None, help="Markdown report path (default: OUT/results.md)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    p.add_argument("--override", action="append", default=[], help="extra dotted recipe override (repeatable)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [m for m in models if m not in MODELS] + [o for o in opts if o not in OPTIMIZERS]
    if bad or not models or not opts:
        print(f"unknown or missing --model / --optimizers entries {bad}; models: {', '.join(MODELS)}; "
              f"optimizers: {', '.join(OPTIMIZERS)}", file=sys.stderr)
        return 2
    if args.config and len(models) > 1:
        print("--config applies to a single --model", file=sys.stderr)
        return 2
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        args.radius_scalers = [float(x) for x in args.radius_scalers.split(",") if x.strip()]
        parse_lrs(args.cs), parse_lrs(args.lrs), parse_lrs(args.sweep_lrs, many=True)
    except ValueError as exc:
        print(f"bad --seeds / --radius-scalers / --cs / --lrs / --sweep-lrs value: {exc}", file=sys.stderr)
        return 2
    if not args.seeds or not args.radius_scalers or min(args.radius_scalers) <= 0:
        print("--seeds and --radius-scalers need at least one value (radius scalers > 0)", file=sys.stderr)
        return 2
    args.configs = {m: args.config or MODELS[m] for m in models}
    data = prepare_data(args)
    args.data_desc = args.data_path or f"{args.corpus or 'Python stdlib'} *.py, first {args.max_bytes:,} bytes"
    results, sweeps, skipped, pngs = {}, {}, {}, {}
    out = Path(args.out)
    plot_dir = Path(args.plots_dir) if args.plots_dir else out / "plots"
    for model in models:
        results[model], sweeps[model], skipped[model] = run_model(args, model, args.configs[model], data, opts)
        try:
            pngs[model] = plots.plot_model(model, results[model], plot_dir) if results[model] else []
        except ImportError:
            print("matplotlib is not installed (pip install megatron-sso[plot]): no plots", file=sys.stderr)
            pngs[model] = []
    tables.write_csv(out / "compare.csv", results)
    command = "python scripts/compare_optimizers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    grids = {**SWEEP, **parse_lrs(args.sweep_lrs, many=True)}
    if any(sweeps.values()):
        try:
            for model in models:
                pngs[model] += plots.plot_sweep(model, sweeps[model], plot_dir) if sweeps[model] else []
        except ImportError:
            pass
    report.write(Path(args.report) if args.report else out / "results.md", args, results, sweeps, skipped, pngs,
                 grids, command)
    print(f"wrote {out / 'compare.csv'}, {sum(map(len, pngs.values()))} plots, report", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
