"""Compare lambda solvers on a real training trajectory (byte-level GPT on stdlib source).

For each solver: trains the same TinyGPT from the same seed with SSO on the hidden matrices
and AdamW elsewhere, and prints mean msign calls per matrix per step, the largest |h| seen
(measured on the applied direction), the final loss, and the optimizer-step time.

    python scripts/solver_study.py --steps 200 --dim 128
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_sso import SpectralSphere
from megatron_sso.testing.tiny_gpt import TinyGPT, batches, lm_loss, stdlib_corpus


def run(solver: str, evals: int, args) -> dict:
    torch.manual_seed(args.seed)
    data = torch.frombuffer(bytearray(stdlib_corpus(2_000_000)), dtype=torch.uint8)
    model = TinyGPT(dim=args.dim, layers=args.layers, heads=4, ffn=2 * args.dim, seq=64)
    sso = SpectralSphere(model.hidden_matrices(), lr=args.lr, lambda_solver=solver, lambda_evals=evals)
    adam = torch.optim.AdamW(model.other_parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    it = batches(data, 16, 64, torch.Generator().manual_seed(args.seed + 1))
    calls = matrices = fallbacks = 0
    max_h = 0.0
    opt_time = 0.0
    for _ in range(args.steps):
        x, y = next(it)
        lm_loss(model, x, y).backward()
        t = time.perf_counter()
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
        loss = lm_loss(model, *next(it)).item()
    return dict(solver=f"{solver}({evals})" if solver == "secant" else solver,
                calls=calls / matrices, max_h=max_h, loss=loss, fb=fallbacks / matrices, ms=1000 * opt_time / args.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"TinyGPT dim={args.dim} layers={args.layers}, {args.steps} steps, lr={args.lr}, tol 2e-4")
    print(f"{'solver':<12} {'msign/matrix':>12} {'max|h|':>9} {'fallbacks':>9} {'loss':>7} {'opt ms/step':>12}")
    for solver, evals in (("secant", 2), ("bisect", 1)):
        r = run(solver, evals, args)
        print(f"{r['solver']:<12} {r['calls']:>12.3f} {r['max_h']:>9.1e} {r['fb']:>9.2%} {r['loss']:>7.3f} {r['ms']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
