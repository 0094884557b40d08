"""Compare lambda solvers on a real training trajectory (byte-level GPT on stdlib source).

For each solver: trains the same TinyGPT from the same seed with SSO on the hidden matrices
and AdamW elsewhere, and prints mean msign calls per matrix per step, the largest |h| seen
(measured on the applied direction), the final loss (mean over 8 held-out batches) and the
optimizer-step time.

``--accuracy`` also measures, on every warm step of every matrix, how far the solver's direction
is from the exact SSO direction ``Phi* = msign(M + lambda* Theta)`` (a 6-evaluation solve
started at the solver's own root, |h| ~ 1e-8):

* ``1 - cos``: the cosine misses how much of SSO's correction is kept, because ``Phi*`` and
  MuonSphere's ``msign(M)`` already have cosine ~0.98 (the correction is a low-rank change
  of a full-rank direction); so also
* ``rel``: ``||Phi - Phi*|| / ||Phi_MS - Phi*||`` with ``Phi_MS = msign(M) - h(0) Theta``
  (MuonSphere's direction projected onto the tangent space): 0 is exact SSO, ~1 is no better
  than a projected MuonSphere step.

    python scripts/solver_study.py --steps 200 --dim 64 --solvers secant:1,secant:2,secant:3,bisect --accuracy
    python scripts/solver_study.py --steps 150 --dim 64 --solvers secant:2,krylov --accuracy
"""

from __future__ import annotations

import argparse
import time

import torch

import megatron_sso.optim.sphere_update as sphere_update
from megatron_sso import SpectralSphere
from megatron_sso.ops import lambda_solver
from megatron_sso.models.tiny_gpt import TinyGPT, batches, lm_loss, stdlib_corpus


class AccuracyProbe:
    """Wraps the secant solver as seen by ``sphere_update_`` and records direction errors."""

    def __init__(self) -> None:
        self.cos_err: list[torch.Tensor] = []
        self.rel: list[torch.Tensor] = []
        self._orig = lambda_solver.solve_lambda_secant

    def __enter__(self) -> "AccuracyProbe":
        sphere_update.solve_lambda_secant = self._solve
        return self

    def __exit__(self, *exc) -> None:
        sphere_update.solve_lambda_secant = self._orig

    def _solve(self, residual, lam0, slope0, evals=2, bound=None, interpolate=True, **kw):
        sol = self._orig(residual, lam0, slope0, evals, bound, interpolate, **kw)
        if slope0 is None:  # cold start: not part of the steady-state statistics
            return sol
        calls = residual.calls
        exact = self._orig(residual, sol.lam, slope0, 6, bound, True)
        h0, phi0 = residual(torch.zeros_like(lam0))
        ms = residual.materialise(residual.project(phi0, h0))
        residual.calls = calls  # probe evaluations are not the solver's cost

        def dist(a):
            return (a.float() - exact.phi.float()).flatten(1).norm(dim=1)

        a, b = sol.phi.flatten(1).double(), exact.phi.flatten(1).double()
        self.cos_err.append(1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
        self.rel.append(dist(sol.phi) / dist(ms).clamp_min(1e-12))
        return sol

    def summary(self) -> str:
        def q(xs, p):
            return torch.cat([x.flatten() for x in xs]).double().quantile(p).item()

        return (f"1-cos p50 {q(self.cos_err, .5):.1e} p95 {q(self.cos_err, .95):.1e} | "
                f"rel p50 {q(self.rel, .5):.3f} p95 {q(self.rel, .95):.3f}")


class KrylovProbe(AccuracyProbe):
    """The same measurement for ``lambda_solver="krylov"`` (one msign per matrix per step): the
    exact direction is a 6-evaluation secant solve started at the Krylov root; also records
    ``h_raw``, the msign's ``|h|`` at the model's root before the tangent projection."""

    def __init__(self) -> None:
        super().__init__()
        self.h_raw: list[torch.Tensor] = []
        self._orig_k = sphere_update.solve_lambda_krylov
        self._seen: set = set()

    def __enter__(self) -> "KrylovProbe":
        sphere_update.solve_lambda_krylov = self._solve_k
        return self

    def __exit__(self, *exc) -> None:
        sphere_update.solve_lambda_krylov = self._orig_k

    def _solve_k(self, M, u, v, msign_fn, lam0, **kw):
        sol = self._orig_k(M, u, v, msign_fn, lam0, **kw)
        if tuple(M.shape) not in self._seen:  # the first call per bucket is the cold step
            self._seen.add(tuple(M.shape))
            return sol
        residual = lambda_solver.TangentResidual(M, u, v, msign_fn)
        exact = self._orig(residual, sol.lam, sol.slope, 6, kw.get("bound"), True)
        h0, phi0 = residual(torch.zeros_like(lam0))
        ms = residual.project(phi0, h0)

        def dist(a):
            return (a.float() - exact.phi.float()).flatten(1).norm(dim=1)

        a, b = sol.phi.flatten(1).double(), exact.phi.flatten(1).double()
        self.cos_err.append(1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
        self.rel.append(dist(sol.phi) / dist(ms).clamp_min(1e-12))
        self.h_raw.append(sol.h_raw)
        return sol

    def summary(self) -> str:
        h = torch.cat([x.flatten() for x in self.h_raw]).double()
        return (super().summary() + f" | h_raw p50 {h.quantile(.5).item():.1e} p95 {h.quantile(.95).item():.1e}"
                f" max {h.max().item():.1e}")


def run(solver: str, evals: int, args) -> dict:
    torch.manual_seed(args.seed)
    data = torch.frombuffer(bytearray(stdlib_corpus(2_000_000)), dtype=torch.uint8)
    model = TinyGPT(dim=args.dim, layers=args.layers, heads=4, ffn=2 * args.dim, seq=64)
    sso = SpectralSphere(model.hidden_matrices(), lr=args.lr, lambda_solver=solver, lambda_evals=evals)
    adam = torch.optim.AdamW(model.other_parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    it = batches(data, 16, 64, torch.Generator().manual_seed(args.seed + 1))
    held = [next(batches(data, 16, 64, torch.Generator().manual_seed(10_000 + i))) for i in range(8)]
    calls = matrices = fallbacks = 0
    max_h = 0.0
    opt_time = 0.0
    probe = None
    if args.accuracy and solver in ("secant", "krylov"):
        probe = AccuracyProbe() if solver == "secant" else KrylovProbe()
    for _ in range(args.steps):
        x, y = next(it)
        lm_loss(model, x, y).backward()
        t = time.perf_counter()
        if probe is not None:
            with probe:
                sso.step()
        else:
            sso.step()
        opt_time += time.perf_counter() - t
        adam.step()
        sso.zero_grad()
        adam.zero_grad()
        st = sso.last_step_stats
        calls += st["msign_calls"]
        matrices += st["num_matrices"]
        max_h = max(max_h, st["max_abs_h"])
        fallbacks += st["lambda_fallbacks"]
    with torch.no_grad():
        loss = sum(lm_loss(model, x, y).item() for x, y in held) / len(held)
    return dict(solver=f"{solver}({evals})" if solver == "secant" else solver, calls=calls / matrices,
                max_h=max_h, loss=loss, fb=fallbacks / matrices, ms=1000 * opt_time / args.steps,
                accuracy=probe.summary() if probe is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solvers", default="secant:2,bisect",
                    help="comma list of secant:<evals>, bisect and krylov (default: %(default)s)")
    ap.add_argument("--accuracy", action="store_true", help="measure direction errors (slow: 8 extra msigns)")
    args = ap.parse_args()
    print(f"TinyGPT dim={args.dim} layers={args.layers}, {args.steps} steps, lr={args.lr}, tol 2e-4")
    print(f"{'solver':<12} {'msign/matrix':>12} {'max|h|':>9} {'fallbacks':>9} {'loss':>7} {'opt ms/step':>12}")
    for item in args.solvers.split(","):
        solver, _, evals = item.strip().partition(":")
        if solver not in ("secant", "bisect", "krylov"):
            raise SystemExit(f"unknown solver {solver!r} in --solvers (use secant:<evals>, bisect or krylov)")
        r = run(solver, int(evals or 1), args)
        print(f"{r['solver']:<12} {r['calls']:>12.3f} {r['max_h']:>9.1e} {r['fb']:>9.2%} {r['loss']:>7.3f} "
              f"{r['ms']:>12.1f}  {r['accuracy']}", flush=True)


if __name__ == "__main__":
    main()
