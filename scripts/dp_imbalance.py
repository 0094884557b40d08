#!/usr/bin/env python
"""Print the data-parallel plan's imbalance (max rank cost / mean rank cost) for a recipe.

    python scripts/dp_imbalance.py dense-1.7b moe-8b-a1b deepnet-200 --dp 8 64 512
    python scripts/dp_imbalance.py deepnet-200 --dp 64 --pp 8 --cost flops

For each recipe and DP size, the imbalance of: the bare zig-zag deal of whole modules (SPEC §4,
``naive``), zig-zag + local-search refinement (``refined``), and the chosen plan (``--split
auto``: modules cut across DP ranks when whole ones cannot reach ``--tolerance``), with
``makespan`` = its max rank cost / the whole-module mean (differs under ``--cost flops``),
per domain (dense; expert for MoE, planned over the expert-data-parallel size). With
``--pp`` > 1 the worst pipeline stage is shown. A pure computation: no process group needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sso.distributed.dp_plan import DEFAULT_TOLERANCE  # noqa: E402
from megatron_sso.distributed.module_inventory import RECIPES, recipe_plans  # noqa: E402
from megatron_sso.optim.config import SphereConfig  # noqa: E402


def rows(recipe: str, dp: int, args: argparse.Namespace) -> list[dict]:
    cfg = SphereConfig(mode=args.mode)
    calls = float(cfg.lambda_evals if cfg.mode == "sso" else 1)
    out = []
    for stage in range(args.pp):
        kw = dict(tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp, stage=stage, calls=calls,
                  steps=cfg.msign_steps, model=args.cost, tolerance=args.tolerance)
        naive = recipe_plans(recipe, dp, split="never", refine=False, **kw)
        whole = recipe_plans(recipe, dp, split="never", **kw)
        chosen = recipe_plans(recipe, dp, split=args.split, **kw)
        for domain, plan in chosen.items():
            out.append({"recipe": recipe, "dp": dp, "stage": stage, "domain": domain, "world": plan.world,
                        "modules": len(whole[domain].pieces), "pieces": len(plan.pieces),
                        "split": plan.split_items, "naive": naive[domain].imbalance,
                        "zigzag": whole[domain].imbalance,
                        "imbalance": plan.imbalance, "makespan": plan.makespan_ratio})
    worst: dict[str, dict] = {}
    for r in out:  # worst stage per domain
        if r["domain"] not in worst or r["makespan"] > worst[r["domain"]]["makespan"]:
            worst[r["domain"]] = r
    return list(worst.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", choices=RECIPES)
    ap.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512], help="data-parallel sizes")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (heads stay whole)")
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: recipe's)")
    ap.add_argument("--etp", type=int, default=1, help="expert-tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (worst stage shown)")
    ap.add_argument("--cost", choices=["numel", "flops"], default="numel")
    ap.add_argument("--split", choices=["never", "auto"], default="auto")
    ap.add_argument("--mode", choices=["sso", "muon_sphere", "muon"], default="sso")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = ap.parse_args(argv)
    print(f"cost={args.cost} split={args.split} tp={args.tp} etp={args.etp} pp={args.pp} "
          f"tolerance={args.tolerance}")
    head = f"{'recipe':<12} {'dp':>4} {'domain':<6} {'ranks':>5} {'modules':>7} {'pieces':>6} " \
           f"{'split':>5} {'naive':>7} {'refined':>7} {'chosen':>7} {'makespan':>8}"
    print(head)
    print("-" * len(head))
    for recipe in args.recipes:
        for dp in args.dp:
            for r in rows(recipe, dp, args):
                print(f"{r['recipe']:<12} {r['dp']:>4} {r['domain']:<6} {r['world']:>5} {r['modules']:>7} "
                      f"{r['pieces']:>6} {r['split']:>5} {r['naive']:>7.4f} {r['zigzag']:>7.4f} {r['imbalance']:>7.4f} "
                      f"{r['makespan']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
