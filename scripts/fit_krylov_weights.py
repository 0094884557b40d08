"""Fit the Krylov lambda model's quadrature weights to a Newton-Schulz coefficient set.

``megatron_sso.ops.krylov_lambda`` models ``msign`` by ``g(x) = sum_j w_j / (x + tau_j^2)`` on a
fixed node grid (``tau_j``, relative to ``||Y||_F``). For the exact polar factor the weights are the
trapezoid rule of ``x^(-1/2) = (2/pi) int dt / (x + t^2)``; to model what Newton-Schulz really
computes, they are fitted here by non-negative least squares (scipy, offline) to
``g(x) = phi(sqrt(x)) / sqrt(x)``, ``phi`` the set's scalar map, on ``s = sqrt(x)`` in
``[1e-10, 1]`` (``1 / s`` above, where only the polar limit matters), with weight
``NS_FIT_WEIGHT`` on ``s >= 1e-3``. Prints the weights as a Python tuple and the fit's errors.

    python scripts/fit_krylov_weights.py --coefficients sso8
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.optimize
import torch

from megatron_sso.ops.krylov_lambda import NS_FIT_WEIGHT, node_grid
from megatron_sso.ops.newton_schulz import resolve_coefficients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coefficients", default="sso8")
    args = ap.parse_args()
    table = resolve_coefficients(args.coefficients, None)
    tau = node_grid()
    s = torch.logspace(-10, 6, 1200, dtype=torch.float64)
    y, g = s.clone(), torch.ones_like(s)
    for a, b, c in table:
        f = a + b * y * y + c * y ** 4
        g, y = g * f, y * f
    g = torch.where(s <= 1, g, 1.0 / s)
    A = 1.0 / ((s * s).unsqueeze(1) + tau.square().unsqueeze(0)) / g.unsqueeze(1)
    rw = torch.where(s >= 1e-3, NS_FIT_WEIGHT, 1.0).to(torch.float64)
    w, _ = scipy.optimize.nnls((A * rw.unsqueeze(1)).numpy(), rw.numpy(), maxiter=20000)
    err = np.abs(A.numpy() @ w - 1)
    sn = s.numpy()
    for lo, hi in ((1e-10, 1e-5), (1e-5, 1e-3), (1e-3, 1.0), (1.0, 1e6)):
        sel = (sn >= lo) & (sn <= hi)
        print(f"# s in [{lo:.0e}, {hi:.0e}]: max relative error {err[sel].max():.2e}")
    print("(" + ", ".join(f"{x!r}" for x in w.tolist()) + ")")


if __name__ == "__main__":
    main()
