"""``results.md``: the GPU check's tables, written from the JSON after every section."""

from __future__ import annotations


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def render(results: dict) -> str:
    env = results["environment"]
    lines = [f"# GPU check ({'CPU dry run' if env['dry_run'] else env['device_name']})", "",
             f"{env['date']} · device {env['device_name']} · torch {env['torch']} · CUDA {env['cuda']} · "
             f"megatron-core {env.get('megatron_core', '–')} · Python {env['python']} · "
             f"fp32 matmul precision {env['fp32_matmul_precision']}", ""]
    sections = results["sections"]
    checks = [(name, c) for name, s in sections.items() for c in s.get("result", {}).get("checks", [])]
    failed = [c for _, c in checks if not c["passed"]]
    errors = [name for name, s in sections.items() if s["status"] != "ok"]
    lines += [f"**{len(checks) - len(failed)} of {len(checks)} checks passed**"
              + (f"; sections not completed: {', '.join(errors)}" if errors else "") + ".", ""]
    lines += ["## Checks", ""] + _table(["section", "check", "value", "rule", "limit", "passed"],
                                        [[n, c["check"], c["value"], c["rule"], c["limit"], "yes" if c["passed"] else "**NO**"]
                                         for n, c in checks])
    eng = sections.get("engine", {}).get("result")
    if eng and eng.get("runs"):
        lines += [f"## Megatron-Core GPT, Dense-1.7B layer shapes ({eng['runs'][0]['layers']} layers, one "
                  f"process, {eng['backend']}, {'bf16 + fp32 main params' if eng['runs'][0]['bf16'] else 'fp32'})", ""]
        base = next((r for r in eng["runs"] if r["optimizer"] == eng["muon_name"]), None)
        lines += _table(["optimizer", "steps", "median step ms", "vs our Muon", "median optimizer ms",
                         "peak GiB", "loss first → last", "msign / matrix (warm)"],
                        [[r["optimizer"], r["steps"], r["median_step_ms"],
                          r["median_step_ms"] / base["median_step_ms"] if base else None, r["median_opt_step_ms"],
                          r["peak_memory_gib"], f"{r['loss_first']:.3f} → {r['loss_last']:.3f}",
                          (sum(r["msign_calls_per_matrix"][1:]) / max(1, len(r["msign_calls_per_matrix"]) - 1))
                          if len(r["msign_calls_per_matrix"]) > 1 else None] for r in eng["runs"]])
    thr = sections.get("throughput", {}).get("result")
    if thr:
        lines += ["## Newton-Schulz (8 steps) vs a plain matmul X Xᵀ of the same shape", ""]
        lines += _table(["case", "shape", "dtype", "msign ms", "msign TFLOP/s", "matmul TFLOP/s", "fraction"],
                        [[r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["msign_ms"], r["msign_tflops"],
                          r["matmul_tflops"], r["fraction_of_matmul"]] for r in thr["rows"]])
    sync = sections.get("host_syncs", {}).get("result")
    if sync:
        lines += ["## Host synchronisations in one warm `SpectralSphere.step`", ""]
        lines += _table(["solver", "host reads", "sync-debug warnings", "profiler syncs / DtoH copies"],
                        [[k, v["host_reads_total"], v.get("sync_debug_warnings"),
                          " / ".join(str(x) for x in v["profiler"].values()) if "profiler" in v else None]
                         for k, v in sync.items() if k != "checks"])
    for name, s in sections.items():
        if s["status"] != "ok":
            lines += [f"## {name}: {s['status']}", "", "```", s.get("error", "").strip()[-1500:], "```", ""]
    return "\n".join(lines)
