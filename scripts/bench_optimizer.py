"""Time one optimizer step on the atomic modules of one Dense 1.7B layer (or a width proxy).

Optimizers, all timed in the same process with interleaved repeats (so machine noise hits
each alike): AdamW (torch, fused where available), Muon, MuonSphere, SSO (our secant solver)
SSO with the paper's bracket-and-bisect solver, and SSO with the Krylov solver
(``sso_krylov``: one msign per matrix). Reports the median step time, the ratios
SSO/Muon and SSO/MuonSphere, msign calls per matrix, and Newton-Schulz FLOP/s as a fraction
of a plain matmul of the same size.

Shapes (SPEC §6, per layer, after the paper's atomic-module split §4.3): 16 Q heads and 8 K
and 8 V groups of ``head_dim x hidden``, the output projection ``hidden x hidden``, gate and
up ``ffn x hidden``, down ``hidden x ffn``. ``--scale 4`` divides hidden, head_dim and ffn by 4.

Gradients follow a fixed synthetic trajectory shaped like training (low rank plus noise, with
drifting directions), and every optimizer runs ``--warmup`` steps first, so the timed steps
are warm (cached singular vectors, cached lambda and slope).

    python scripts/bench_optimizer.py --scale 4            # CPU-sized proxy
    python scripts/bench_optimizer.py --scale 1 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from megatron_sso import SpectralSphere
from megatron_sso.ops import msign


def layer_shapes(hidden: int, head_dim: int, heads: int, groups: int, ffn: int) -> list[tuple[int, int]]:
    return ([(head_dim, hidden)] * (heads + 2 * groups) + [(hidden, heads * head_dim)]
            + [(ffn, hidden)] * 2 + [(hidden, ffn)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GradientStream:
    """Low-rank-plus-noise gradients whose factors drift a little every step."""

    def __init__(self, params: list[torch.Tensor], seed: int = 0, rank: int = 8) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        dev = params[0].device
        self.factors = [(torch.randn(p.size(0), rank, generator=g).to(dev),
                         torch.randn(p.size(1), rank, generator=g).to(dev)) for p in params]
        self.params = params

    def fill(self) -> None:
        for p, (L, R) in zip(self.params, self.factors):
            L.add_(torch.randn_like(L), alpha=0.05)
            p.grad = (L @ R.T) / L.size(1) + 0.3 * torch.randn_like(p)


def make_params(shapes, device, seed) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) / s[1] ** 0.5).to(device)) for s in shapes]


def build(name: str, params, msign_method: str):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1)
    mode, solver = {"muon": ("muon", "secant"), "muon_sphere": ("muon_sphere", "secant"),
                    "sso": ("sso", "secant"), "sso_bisect": ("sso", "bisect"),
                    "sso_krylov": ("sso", "krylov")}[name]
    return SpectralSphere(params, lr=5e-3, mode=mode, lambda_solver=solver, msign_method=msign_method)


def ns_flops(m: int, n: int, steps: int = 8) -> float:
    """FLOPs of ``steps`` Newton-Schulz steps on the wide orientation (m <= n): per step
    ``A = X X^T`` (2 m^2 n), ``b A + c A^2`` (2 m^3) and ``B X`` (2 m^2 n)."""
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m ** 3)


def krylov_flops(m: int, n: int, blocks: int = 32) -> float:
    """FLOPs of the Krylov lambda solver's matrix work (``ops.krylov_space``) on the wide
    orientation ``p x q``: ``k`` products ``Y (Y^T Z)`` with 2 columns (``8 p q`` each), ``Y b``,
    two Gram-Schmidt passes per block (~``40 p k`` each step) and ``T = Q^T (G Q)``; the small
    problem (one ``2k x 2k`` eigh, quadrature and Newton on ``2 x 2`` blocks) is ~1e-3 of it."""
    from megatron_sso.ops.krylov_space import krylov_blocks_for
    p, q = min(m, n), max(m, n)
    k = krylov_blocks_for(p, blocks)
    return 8 * k * p * q + 2 * p * q + 40 * p * k * k + 8 * p * k * k


def time_it(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=4, help="divide hidden, head_dim and ffn by this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizers", default="adamw,muon,muon_sphere,sso,sso_bisect")
    ap.add_argument("--msign-method", choices=["standard", "gram"], default="standard",
                    help="Newton-Schulz on the matrix, or on its Gram (SSO then shares one Gram per step)")
    args = ap.parse_args()
    device = torch.device(args.device)
    hidden, head_dim, ffn = 2048 // args.scale, 128 // args.scale, 6144 // args.scale
    shapes = layer_shapes(hidden, head_dim, 16, 8, ffn)
    names = args.optimizers.split(",")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {machine}; torch {torch.__version__}")
    print(f"one Dense-1.7B layer / {args.scale}: hidden {hidden}, head_dim {head_dim}, ffn {ffn}; "
          f"{len(shapes)} atomic modules, {sum(a * b for a, b in shapes) / 1e6:.1f}M weights; "
          f"msign method: {args.msign_method}")

    runs = {}
    for name in names:
        params = make_params(shapes, device, seed=0)
        opt = build(name, params, args.msign_method)
        stream = GradientStream(params, seed=1)
        for _ in range(args.warmup):
            stream.fill()
            opt.step()
        runs[name] = (opt, stream, [], [])
    for _ in range(args.repeats):  # interleaved: every optimizer once per round
        for name, (opt, stream, times, calls) in runs.items():
            stream.fill()
            times.append(time_it(opt.step, device, 1))
            if isinstance(opt, SpectralSphere):
                st = opt.last_step_stats
                calls.append(st["msign_calls_per_matrix"])
    med = {n: statistics.median(r[2]) for n, r in runs.items()}
    print(f"\n{'optimizer':<12} {'median ms':>10} {'msign/matrix':>13}")
    for name, (_, _, times, calls) in runs.items():
        c = f"{statistics.mean(calls):.2f}" if calls else "-"
        print(f"{name:<12} {1000 * med[name]:>10.1f} {c:>13}")
    if "sso" in med:
        for other in ("muon", "muon_sphere", "sso_bisect"):
            if other in med:
                print(f"SSO / {other}: {med['sso'] / med[other]:.2f}")
    if "sso_krylov" in med:  # lambda_solver="krylov": one msign per matrix + the Krylov overhead
        for other in ("muon_sphere", "sso"):
            if other in med:
                print(f"SSO-krylov / {other}: {med['sso_krylov'] / med[other]:.2f}")

    # Newton-Schulz vs plain matmul throughput on the layer's largest shape.
    m, n = max(shapes, key=lambda s: s[0] * s[1])
    X = torch.randn(m, n, device=device)
    a = torch.randn(min(m, n), max(m, n), device=device)
    b = torch.randn(max(m, n), min(m, n), device=device)
    t_ns = time_it(lambda: msign(X), device, args.repeats)
    t_mm = time_it(lambda: a @ b, device, args.repeats)
    ns_rate = ns_flops(m, n) / t_ns
    mm_rate = 2 * min(m, n) ** 2 * max(m, n) / t_mm
    print(f"\nmsign {m}x{n}: {ns_rate / 1e9:.1f} GFLOP/s vs matmul {mm_rate / 1e9:.1f} GFLOP/s "
          f"({100 * ns_rate / mm_rate:.0f}% of a plain matmul)")
    for shape in ((2048, 6144), (128, 2048), *sorted(set(shapes))):
        print(f"Krylov overhead {shape[0]}x{shape[1]} (krylov_blocks 32): "
              f"{100 * krylov_flops(*shape) / ns_flops(*shape):.2f}% of one msign's FLOPs")


if __name__ == "__main__":
    main()
