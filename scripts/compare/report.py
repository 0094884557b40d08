"""The Markdown report of a comparison: tables, the issue's targets checked, plots linked.

Every sentence with a number is computed from the runs' records; the report states when the
paper's ordering does not reproduce and lists the facts that bear on it (lr at the edge of its
sweep, weight norms, throughput) without claiming a cause. Paper numbers: SPEC §7.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import tables as T
from .runs import LABELS, MODELS

PAPER_ORDER = ("sso", "muon_sphere", "muon", "adam")
"""The paper's final validation-loss ordering, best first (SPEC §7, dense 1.7B and MoE 8B)."""
PAPER_MAXVIO = "AdamW 0.173, Muon 0.188, SSO 0.117 (MoE 8B-A1B, SPEC §7)"
KEEP = "<!-- written by hand below this line: scripts/compare_optimizers.py keeps it -->"
"""A report file's hand-written reading (after this marker) survives regeneration."""
SPHERE_TOL = 1e-3  # issue 7: every SSO module's spectral norm within 1e-3 of its radius
ACT_BOUND = 2.0    # issue 7: SSO activation RMS max/min over training <= 2x


def _lbl(opt: str) -> str:
    return LABELS.get(opt, opt)


def _seeds(run) -> str:
    """``mean (v1, v2)`` of the final validation loss over the seeds (one value for one seed)."""
    vals = run.finals
    return f"{run.mean_final:.4f}" + (f" ({', '.join(f'{v:.4f}' for v in vals)})" if len(vals) > 1 else "")


def _versus(a, b) -> str:
    """How the difference of two entries' mean final losses compares with their seed spread."""
    if len(a.finals) < 2 and len(b.finals) < 2:
        return "one seed: no spread to compare with"
    diff, spread = abs(a.mean_final - b.mean_final), max(a.spread, b.spread)
    where = "inside" if diff <= spread else "outside"
    return f"difference {diff:.4f}, {where} the seed spread (max - min over seeds, up to {spread:.4f})"


def _table(model: str, runs: dict) -> list[str]:
    target = runs["adam"].mean_final if "adam" in runs else None
    moe = any(T.maxvio(r) is not None for run in runs.values() for r in run.recs)
    head = ["optimizer", "lr", "c", "final val loss (mean (seeds))", "first eval step <= AdamW final val",
            "tokens/s (median)", "ms/step (median)", "CPU ms/step (median)", "max sigma/R at end"]
    head += ["MaxVio (late median)"] if moe else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt, run in runs.items():
        reach = "-" if target is None else (str(T.first_step_at_or_below(run.recs, target) or "not reached"))
        cells = [_lbl(opt), f"{run.lr:g}", "-" if run.c is None else f"{run.c:g}", _seeds(run), reach,
                 f"{T.tokens_per_s(run.recs):,.0f}",
                 f"{1e3 * T.median_step_s(run.recs):.0f}", f"{1e3 * T.median_step_s(run.recs, 'step_cpu_s'):.0f}",
                 f"{T.final_sigma_max(run.recs):.3f}"]
        if moe:
            cells.append(f"{T.tail_maxvio(run.recs):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets(args, model: str, runs: dict, sweep: dict, grids: dict) -> list[str]:
    """The issue's targets, met or not, with the measured numbers (seed means); then SSO vs Muon."""
    fin = {o: r.mean_final for o, r in runs.items()}
    out = []
    if {"sso", "muon", "adam"} <= fin.keys():
        ok = fin["sso"] <= fin["muon"] and fin["sso"] < fin["adam"]
        out.append(f"- SSO's final validation loss <= Muon's and < AdamW's: **{'met' if ok else 'NOT met'}** "
                   f"(SSO {_seeds(runs['sso'])}, Muon {_seeds(runs['muon'])}, AdamW {_seeds(runs['adam'])}; "
                   f"SSO vs Muon: {_versus(runs['sso'], runs['muon'])}).")
    for other in ("muon_hyperball", "muon_sphere"):
        if {"sso", other} <= fin.keys():
            better = "SSO" if fin["sso"] < fin[other] else _lbl(other)
            out.append(f"- SSO vs {_lbl(other)}: {better} lower ({fin['sso']:.4f} vs {fin[other]:.4f}; "
                       f"{_versus(runs['sso'], runs[other])}).")
    if "sso" in runs:
        dev = T.sphere_deviation(runs["sso"].recs)
        out.append(f"- Every SSO module's sigma within {SPHERE_TOL:g} of its radius at every logged step: "
                   f"**{'met' if dev <= SPHERE_TOL else 'NOT met'}** (largest |sigma/R - 1| = {dev:.1e}).")
        start = min(args.warmup, max(args.steps // 5, 1))
        sso = T.activation_ratios(runs["sso"].recs, start)
        if sso:
            worst = max(sso.values())[0]
            line = (f"- SSO's activation RMS bounded (max/min <= {ACT_BOUND:g} per block from the end of warm-up, "
                    f"step {start}): **{'met' if worst <= ACT_BOUND else 'NOT met'}** (worst block {worst:.2f}; "
                    f"from step 1: {max(T.activation_ratios(runs['sso'].recs).values())[0]:.2f})")
            if "adam" in runs and T.activation_ratios(runs["adam"].recs, start):
                adam = T.activation_ratios(runs["adam"].recs, start)
                grew = sum(1 for _, g in adam.values() if g > 1)
                line += (f"; AdamW's max/min up to {max(adam.values())[0]:.2f}, last/first > 1 in {grew} of "
                         f"{len(adam)} blocks")
            out.append(line + ".")
    if {"sso", "muon"} <= fin.keys() and fin["sso"] > fin["muon"]:
        out.append(f"- SSO is behind Muon by {fin['sso'] - fin['muon']:.4f} nats. What the records show (not a proven "
                   "cause):")
        for opt in ("sso", "muon"):
            tried = sorted(lr for lr, _ in sweep.get(opt, {}).get(runs[opt].c, ()))
            if tried and runs[opt].lr in (tried[0], tried[-1]) and len(tried) > 1:
                out.append(f"  - {_lbl(opt)}'s best lr {runs[opt].lr:g} is at an edge of its sweep "
                           f"({tried[0]:g}-{tried[-1]:g} after extension): it may be under-tuned.")
            elif opt not in sweep:
                out.append(f"  - {_lbl(opt)}'s lr {runs[opt].lr:g} was fixed, not swept in this run.")
        if "sso" in sweep and len(sweep["sso"]) > 1:
            best = {c: min(v for _, v in res) for c, res in sweep["sso"].items()}
            out.append("  - SSO's best sweep loss per radius scaler: " + ", ".join(
                f"c = {c:g}: {v:.4f}" for c, v in best.items()) + f"; the final run uses c = {runs['sso'].c:g}.")
        muon, sso = T.final_sigma_max(runs["muon"].recs), T.final_sigma_max(runs["sso"].recs)
        if muon > 1.05 * sso:
            out.append(f"  - Muon's weights end at {muon:.2f}x their radius (max over module kinds), SSO's are held "
                       f"at {sso:.3f}x: unconstrained weights can sharpen the logits faster in a short run; the "
                       f"paper's gain is measured after 100B tokens, far beyond {args.steps} steps.")
        else:
            out.append(f"  - Muon's weights end at {muon:.2f}x their radius, SSO's at {sso:.3f}x: weight growth does "
                       "not explain the gap in this run.")
        tok = T.tokens_per_s(runs["sso"].recs) / T.tokens_per_s(runs["muon"].recs)
        out.append(f"  - Same steps, not same time: SSO runs at {tok:.2f}x Muon's tokens/s here.")
    if "sso" in runs and "adam" in runs:
        hit = T.first_step_at_or_below(runs["sso"].recs, fin["adam"])  # first seed against AdamW's mean
        if hit is not None:
            out.append(f"- SSO reaches AdamW's final validation loss at step {hit} of {args.steps} "
                       f"({100 * (1 - hit / args.steps):.0f}% fewer steps; paper at 1.7B: 19%; the step is the "
                       f"first evaluation at or below it, every {args.eval_interval} steps).")
    return out


def write(path: Path, args, results: dict, sweeps: dict, skipped: dict, plots: dict, grids: dict,
          command: str) -> None:
    """The report at ``path``; plots are linked relative to it. Anything after :data:`KEEP` in an
    existing file at ``path`` is kept (the human reading of the numbers)."""
    chosen = (f"best final validation loss of a {args.sweep_steps}-step sweep unless fixed by --lrs; the sphere "
              f"entries over lr x radius scaler c in {{{', '.join(f'{c:g}' for c in args.radius_scalers)}}} unless "
              "fixed by --cs" if args.sweep else "fixed: --lrs or the middle of its grid")
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"# Optimizer comparison: {', '.join(results)} tiny model(s), through Megatron-Bridge", "",
             f"Machine: {T.machine()}.", "", f"Command: `{command}`", "",
             f"Protocol: {args.steps} steps per run, same data (`{args.data_desc}`, byte-level); every final run "
             f"at seed(s) {seeds} (model init and data order; the sweep at {args.seeds[0]}), final losses are the "
             f"mean over seeds with each seed's value in brackets; validation every {args.eval_interval} steps over {args.eval_iters} batches (Bridge's "
             f"eval on the recipe's validation split), monitoring every {args.monitor_interval} steps. Each "
             f"optimizer at its own lr ({chosen}). "
             "Nothing was tuned toward the paper's ordering. Times are medians after 5 steps: wall-clock, and "
             "this process's CPU time (all threads); on a shared machine (load average above 2 cores) compare "
             "ratios, not absolute tokens/s.", ""]
    for model, runs in results.items():
        lines += [f"## {model} (`{getattr(args, 'configs', MODELS).get(model, model)}`)", "", *_table(model, runs), ""]
        fin = {o: r.mean_final for o, r in runs.items()}
        order = sorted(fin, key=fin.get)
        paper = [o for o in PAPER_ORDER if o in fin]
        if len(paper) > 1:
            same = [o for o in order if o in paper] == paper
            chain = _lbl(order[0])
            for a, b in zip(order, order[1:]):
                close = len(args.seeds) > 1 and fin[b] - fin[a] <= max(runs[a].spread, runs[b].spread)
                chain += (" ≈ " if close else " < ") + _lbl(b)
            lines += [f"The paper's ordering {' < '.join(_lbl(o) for o in paper)} "
                      f"{'reproduces' if same else 'does NOT reproduce'} at this scale (measured, seed means: "
                      f"{chain}" + ("; ≈: the difference is inside the seed spread" if " ≈ " in chain else "")
                      + ").", ""]
        lines += _targets(args, model, runs, sweeps.get(model, {}), grids) + [""]
        layers = sorted({k for run in runs.values() for r in run.recs for k in r if k.startswith("maxvio/")})
        if layers:
            lines += [f"Router MaxVio, {len(layers)} MoE layer(s) monitored, mean over layers, median of the last "
                      "quarter of the monitored steps: " + ", ".join(f"{_lbl(o)} {T.tail_maxvio(r.recs):.3f}"
                                                                      for o, r in runs.items())
                      + f". Paper: {PAPER_MAXVIO}.", ""]
        for opt, why in skipped.get(model, {}).items():
            lines += [f"Skipped {_lbl(opt)}: {why}", ""]
    if any(sweeps.values()):
        lines += ["## Learning-rate x radius-scaler sweep", "",
                  f"Final validation loss after {args.sweep_steps} steps at seed {args.seeds[0]}; the best (lr, c) "
                  "was kept. Each c's grid is extended past an edge holding its best lr (up to "
                  f"{args.sweep_extend} times); MuonSphere's and SSO's grids are multiplied by c (same relative "
                  "step), Muon-Hyperball's lr is relative already.", ""]
        for model, sweep in sweeps.items():
            rows = [(o, c, res) for o, per_c in sweep.items() for c, res in per_c.items()]
            width = max((len(res) for _, _, res in rows), default=0)
            if not width:
                continue
            lines += [f"| {model} | c | " + " | ".join("lr / val" for _ in range(width)) + " |",
                      "|---|---|" + "---|" * width]
            lines += [f"| {_lbl(o)} | {'-' if c is None else f'{c:g}'} | "
                      + " | ".join(f"{lr:g} / {v:.4f}" for lr, v in res) + " |" * (width - len(res) + 1)
                      for o, c, res in rows]
            lines.append("")
    links = [p for ps in plots.values() for p in ps]
    if links:
        rel = [os.path.relpath(p, path.parent) for p in links]
        lines += ["## Plots", "", ", ".join(f"[{Path(r).name}]({r})" for r in rel), ""]
    if path.is_file() and KEEP in path.read_text():
        lines += [KEEP + path.read_text().split(KEEP, 1)[1].rstrip("\n"), ""]
    else:
        lines += [KEEP, "", "## Reading it", "", "(to be written after looking at the numbers and plots)", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
