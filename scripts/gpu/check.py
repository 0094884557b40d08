"""The GPU check's driver: every section in turn under one time budget, results after each.

    python scripts/gpu/check.py [--cpu-dry-run] [--out DIR] [--layers N] [--steps N] [--budget-s S]

Sections: ``msign`` (vs the float64 SVD, fp32 and bf16), ``step`` (two SSO steps on the device vs
the CPU and vs float64), ``solver`` (msign calls per matrix), ``host_syncs`` (inside
``SpectralSphere.step``), ``throughput`` (Newton-Schulz vs matmul), ``engine`` (Megatron-Core GPT
with Dense-1.7B layer shapes: adam, our muon, muon_sphere, sso). A section that raises is recorded
(traceback in the JSON and results.md) and the next one runs; one that would start after the
budget is marked ``skipped``. ``results.json`` and ``results.md`` are rewritten after every
section, so a run killed by its timeout still leaves what it finished. Exit code 0 when every
section ran and every check passed, 1 otherwise (2 for bad arguments).
``--cpu-dry-run``: the same code on tiny sizes on the CPU (gloo, one thread), for the test suite, with
every package the GPU image lacks refused at import (:mod:`image_imports`; ``--all-imports``: off).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from gpu_common import CPU_SIZES, GPU_SIZES  # noqa: E402

SECTION_ORDER = ("msign", "step", "solver", "host_syncs", "throughput", "engine")
MIN_SECONDS = {"msign": 5, "step": 5, "solver": 5, "host_syncs": 5, "throughput": 5, "engine": 30}
"""A section starts only with at least this many seconds of the budget left (the engine's 30:
import Megatron, build four models and run two steps each at the smallest depth)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (gloo, 1 thread)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check", help="results folder ($OUT if set)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (GPU default 8, dry run 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per optimizer (GPU default 30, dry run 3)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (GPU 360, dry run 300)")
    p.add_argument("--sections", default=",".join(SECTION_ORDER), help="comma-separated subset of "
                   + ",".join(SECTION_ORDER))
    p.add_argument("--all-imports", action="store_true", help="dry run: do not refuse the packages the GPU "
                   "image lacks (scripts/gpu/image_imports.py)")
    p.add_argument("--fp32-engine", action="store_true", help="engine in fp32 instead of bf16 + fp32 main params")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTION_ORDER)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTION_ORDER)}")
    dry = args.cpu_dry_run
    args.layers = args.layers if args.layers is not None else (1 if dry else 8)
    args.steps = args.steps if args.steps is not None else (3 if dry else 30)
    args.budget_s = args.budget_s if args.budget_s is not None else (300.0 if dry else 360.0)
    for name in ("layers", "steps", "budget_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)!r}")
    return args


def environment(device: torch.device, dry: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def dist_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": dry,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "megatron_core": dist_version("megatron-core"), "megatron_sso": dist_version("megatron-sso"),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(), "threads": torch.get_num_threads(),
    }


def section_functions(args, device, sizes):
    import correctness
    import throughput

    def engine(deadline):
        import engine as eng

        return eng.engine(device, sizes, args.layers, args.steps, not args.fp32_engine, deadline)

    return {
        "msign": lambda deadline: correctness.msign_vs_svd(device, sizes),
        "step": lambda deadline: correctness.step_vs_cpu(device, sizes),
        "solver": lambda deadline: correctness.solver_calls(device, sizes),
        "host_syncs": lambda deadline: correctness.host_syncs(device, sizes),
        "throughput": lambda deadline: throughput.throughput(device, sizes, reps=3 if args.cpu_dry_run else 20),
        "engine": engine,
    }


def write(out: Path, results: dict) -> None:
    from report import render

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(render(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    finder = None
    if args.cpu_dry_run:
        if not args.all_imports:
            from image_imports import restrict_imports

            finder = restrict_imports()  # what the GPU image lacks fails here as it would there
        device, sizes = torch.device("cpu"), CPU_SIZES
        torch.set_num_threads(1)  # tiny matrices: threads only add contention (35x slower measured on 2 busy cores)
    else:
        if not torch.cuda.is_available():
            print("gpu check: no CUDA device visible (use --cpu-dry-run on a CPU machine)", file=sys.stderr)
            return 2
        device, sizes = torch.device("cuda", 0), GPU_SIZES
    out = Path(args.out)
    results = {"environment": environment(device, args.cpu_dry_run),
               "settings": {"layers": args.layers, "steps": args.steps, "budget_s": args.budget_s,
                            "sizes": sizes.__dict__, "sections": args.sections},
               "sections": {}}
    functions = section_functions(args, device, sizes)
    deadline = start + args.budget_s
    for name in [s for s in SECTION_ORDER if s in args.sections]:
        left = deadline - time.time()
        if left < MIN_SECONDS[name]:
            results["sections"][name] = {"status": "skipped", "error": f"{left:.0f} s of the budget left"}
            write(out, results)
            continue
        t0 = time.time()
        print(f"[gpu check] {name} ({left:.0f} s left)", flush=True)
        try:
            result = functions[name](deadline)
            entry = {"status": "ok", "result": result}
        except Exception:  # record and go on: each section must survive another's failure
            entry = {"status": "error", "error": traceback.format_exc()}
            print(entry["error"], file=sys.stderr, flush=True)
        entry["seconds"] = round(time.time() - t0, 2)
        results["sections"][name] = entry
        if name == "engine" and entry["status"] == "ok":
            results["environment"]["megatron_core"] = entry["result"]["megatron_core"]
        write(out, results)
    if finder is not None:
        results["environment"]["refused_imports"] = sorted(finder.refused)
    results["seconds"] = round(time.time() - start, 1)
    write(out, results)
    checks = [c for s in results["sections"].values() for c in s.get("result", {}).get("checks", [])]
    failed = [c["check"] for c in checks if not c["passed"]]
    incomplete = [n for n, s in results["sections"].items() if s["status"] != "ok"]
    print((out / "results.md").read_text(), flush=True)
    print(f"[gpu check] {len(checks) - len(failed)}/{len(checks)} checks passed, sections not completed: "
          f"{incomplete or 'none'}; {results['seconds']} s; results in {out}", flush=True)
    return 0 if not failed and not incomplete else 1


if __name__ == "__main__":
    sys.exit(main())
