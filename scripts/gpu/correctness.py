"""Correctness on the device: msign against the float64 SVD, one optimizer step against the CPU,
the solver's msign calls per matrix, and host synchronisations inside ``SpectralSphere.step``.

Every reference is independent of the code under test: the float64 SVD polar factor, the same
step computed on the CPU (fp32) and in float64.
"""

from __future__ import annotations

import contextlib

import torch

from gpu_common import Sizes, check, count_cuda_syncs, count_host_reads, profile_syncs, synchronize
from megatron_sso import SpectralSphere
from megatron_sso.ops import msign

MSIGN_FP32_REL = 1e-4
"""fp32 msign vs the SVD polar factor, relative Frobenius error. 8 ``sso8`` steps reach singular
values 1 +- 1e-6 for condition <= 1e3 (tests/test_msign.py); the rest is fp32 round-off."""
MSIGN_BF16_REL = 5e-2
"""bf16 msign: 8 mantissa bits, ~4e-3 per product compounded over 8 steps (tests/test_msign.py)."""
STEP_REL = 1e-4
"""Two SSO steps on the device vs on the CPU, ``||W_dev - W_cpu||_F / ||W_cpu||_F`` (issue 17)."""
SOLVER_WARM_EVALS = 2
"""msign evaluations per matrix on a warm step of the secant solver (``SphereConfig.lambda_evals``)."""


def well_conditioned(m: int, n: int, gen: torch.Generator, cond: float = 20.0) -> torch.Tensor:
    """A float64 matrix with singular values log-spaced over [1/cond, 1] (no near-zero values,
    which Newton-Schulz cannot lift in 8 steps and the SVD polar factor would still map to 1)."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return (U * s) @ V.T


def polar_ref(X: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of the float64 SVD (the exact msign of a full-rank matrix)."""
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def msign_vs_svd(device: torch.device, sizes: Sizes) -> dict:
    gen = torch.Generator().manual_seed(17)
    rows, checks = [], []
    for m, n in sizes.msign_shapes:
        X = well_conditioned(m, n, gen)
        ref = polar_ref(X.to(device)).cpu()  # float64 SVD on the device is faster; same definition
        for name, dtype, limit in (("fp32", torch.float32, MSIGN_FP32_REL), ("bf16", torch.bfloat16, MSIGN_BF16_REL)):
            Y = msign(X.to(device=device, dtype=torch.float32), compute_dtype=dtype)
            err = rel(Y, ref)
            rows.append({"shape": [m, n], "dtype": name, "rel_fro": err,
                         "max_abs": float((Y.double().cpu() - ref).abs().max())})
            checks.append(check(f"msign {name} {m}x{n} vs SVD (rel Frobenius)", err, limit))
    return {"rows": rows, "checks": checks}


def _problem(sizes: Sizes, steps: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=gen, dtype=torch.float64) / n ** 0.5 for m, n in sizes.step_shapes]
    grads = [[torch.randn(m, n, generator=gen, dtype=torch.float64) for m, n in sizes.step_shapes]
             for _ in range(steps)]
    return weights, grads


def _run_steps(weights, grads, device, dtype, **options) -> tuple[list[torch.Tensor], list[dict]]:
    params = [torch.nn.Parameter(w.to(device=device, dtype=dtype, copy=True)) for w in weights]
    opt = SpectralSphere(params, lr=0.02, mode="sso", **options)
    stats = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
        stats.append(opt.last_step_stats)
    return [p.detach() for p in params], stats


def step_vs_cpu(device: torch.device, sizes: Sizes) -> dict:
    """Two SSO steps (cold, then warm) on the device vs the same steps on the CPU in fp32, and
    vs a float64 CPU run (msign and power iteration in fp64)."""
    weights, grads = _problem(sizes, steps=2)
    dev, _ = _run_steps(weights, grads, device, torch.float32)
    cpu, _ = _run_steps(weights, grads, torch.device("cpu"), torch.float32)
    f64, _ = _run_steps(weights, grads, torch.device("cpu"), torch.float64, msign_dtype="fp64", power_dtype="fp64")

    def whole(ws):
        return torch.cat([w.double().cpu().flatten() for w in ws])

    moved = whole(cpu) - whole(weights)
    out = {
        "rel_weights_device_vs_cpu": rel(whole(dev), whole(cpu)),
        "rel_update_device_vs_cpu": rel(whole(dev) - whole(weights), moved),
        "rel_weights_fp32_vs_fp64": rel(whole(cpu), whole(f64)),
        "rel_update_fp32_vs_fp64": rel(moved, whole(f64) - whole(weights)),
        "per_matrix_device_vs_cpu": [rel(a, b) for a, b in zip(dev, cpu)],
    }
    out["checks"] = [
        check("SSO 2 steps: device vs CPU fp32 (rel ||W||)", out["rel_weights_device_vs_cpu"], STEP_REL),
        check("SSO 2 steps: CPU fp32 vs fp64 (rel ||W||)", out["rel_weights_fp32_vs_fp64"], STEP_REL),
    ]
    return out


@contextlib.contextmanager
def counted_msign():
    """Count the matrices that really go through msign inside the sphere update (a batch of B
    matrices counts B), independently of the optimizer's own ``msign_calls`` figure."""
    import megatron_sso.optim.sphere_update as update

    original, box = update.msign, [0]

    def counting(X, *args, **kwargs):
        box[0] += X.numel() // (X.size(-1) * X.size(-2))
        return original(X, *args, **kwargs)

    update.msign = counting
    try:
        yield box
    finally:
        update.msign = original


def solver_calls(device: torch.device, sizes: Sizes) -> dict:
    """msign calls per matrix per step for the secant solver (ours) and the paper's bisection:
    counted at the msign function and as the optimizer reports them."""
    weights, grads = _problem(sizes, steps=sizes.solver_steps, seed=5)
    out = {}
    for solver in ("secant", "bisect"):
        with counted_msign() as counted:
            _, stats = _run_steps(weights, grads, device, torch.float32, lambda_solver=solver)
        out[solver] = {"msign_calls_per_matrix": [s["msign_calls_per_matrix"] for s in stats],
                       "counted_per_matrix": counted[0] / (len(weights) * len(grads)),
                       "reported_per_matrix": sum(s["msign_calls_per_matrix"] for s in stats) / len(stats),
                       "max_abs_h": [s["max_abs_h"] for s in stats]}
    sec = out["secant"]
    warm = sec["msign_calls_per_matrix"][1:]
    out["checks"] = [
        check("secant solver: reported msign calls per matrix on warm steps - 2",
              max(abs(c - SOLVER_WARM_EVALS) for c in warm), 0.0),
        check("secant solver: counted - reported msign calls per matrix",
              abs(sec["counted_per_matrix"] - sec["reported_per_matrix"]), 1e-9),
    ]
    return out


def host_syncs(device: torch.device, sizes: Sizes) -> dict:
    """Host synchronisations in one warm ``SpectralSphere.step`` (secant, ours) and, as the
    positive control that shows the counters see a synchronisation, the paper's bisection
    (one host read per evaluated msign)."""
    weights, grads = _problem(sizes, steps=3, seed=7)
    out, checks = {}, []
    for solver in ("secant", "bisect"):
        params = [torch.nn.Parameter(w.to(device=device, dtype=torch.float32, copy=True)) for w in weights]
        opt = SpectralSphere(params, lr=0.02, mode="sso", lambda_solver=solver)

        for p, gi in zip(params, grads[0]):
            p.grad = gi.to(device=device, dtype=torch.float32)
        opt.step()  # cold step: caches, first root
        for p, gi in zip(params, grads[1]):
            p.grad = gi.to(device=device, dtype=torch.float32)
        synchronize(device)
        with count_host_reads(device) as reads:
            opt.step()
        row = {"host_reads": dict(reads), "host_reads_total": sum(reads.values())}
        if device.type == "cuda":
            for p, gi in zip(params, grads[2]):
                p.grad = gi.to(device=device, dtype=torch.float32)
            torch.cuda.synchronize()
            with count_cuda_syncs() as syncs:
                opt.step()
            row["sync_debug_warnings"] = syncs["warnings"]
            row["sync_debug_where"] = syncs["examples"]
            for p, gi in zip(params, grads[0]):
                p.grad = gi.to(device=device, dtype=torch.float32)
            torch.cuda.synchronize()
            row["profiler"] = profile_syncs(opt.step)
        out[solver] = row
    checks.append(check("bisect (control): host reads in one step", out["bisect"]["host_reads_total"], 1, below=False))
    if device.type == "cuda":
        checks.append(check("secant: sync-debug warnings in one step", out["secant"]["sync_debug_warnings"], 0))
        checks.append(check("bisect (control): sync-debug warnings", out["bisect"]["sync_debug_warnings"], 1, below=False))
        # The profiler's counts (out[...]["profiler"]) are reported, not checked: the profiler may
        # synchronise for its own bookkeeping; sync-debug mode sees only what torch ops ask for.
    else:
        checks.append(check("secant: host reads of device tensors in one step", out["secant"]["host_reads_total"], 0))
    out["checks"] = checks
    return out
