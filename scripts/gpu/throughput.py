"""Newton-Schulz throughput against a plain matrix product of the same shapes.

One Newton-Schulz step on the wide orientation ``X`` (``m x n``, ``m <= n``) is ``A = X X^T``
(``2 m^2 n`` FLOPs), ``B = b A + c A^2`` (``2 m^3``) and ``a X + B X`` (``2 m^2 n``): ``4 m^2 n
+ 2 m^3`` per step, counted without the element-wise terms. The baseline is the product ``X X^T``
alone in the same dtype (the iteration's own largest GEMM shape), so the ratio says how close
msign runs to the rate the library reaches on these shapes; below 1 are the ``m x m`` products,
the normalisation and the casts.
"""

from __future__ import annotations

import torch

from gpu_common import Sizes, time_ms
from megatron_sso.ops import msign

NS_STEPS = 8
"""Newton-Schulz steps of one msign (the paper's ``sso8`` set, SPEC §2)."""


def ns_flops(batch: int, m: int, n: int, steps: int = NS_STEPS) -> float:
    m, n = min(m, n), max(m, n)
    return batch * steps * (4 * m * m * n + 2 * m ** 3)


def throughput(device: torch.device, sizes: Sizes, reps: int) -> dict:
    gen = torch.Generator().manual_seed(11)
    cases = [("single", 1, *sizes.ns_single), ("batched", *sizes.ns_batched)]
    rows = []
    for label, batch, m, n in cases:
        X32 = torch.randn(batch, m, n, generator=gen).to(device)  # random data, never zeros (METHOD.md)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            X = X32.to(dtype)
            ns_ms = time_ms(lambda: msign(X, compute_dtype=dtype), device, reps=reps)
            mm_ms = time_ms(lambda: X @ X.mT, device, reps=reps)
            ns_rate = ns_flops(batch, m, n) / (ns_ms * 1e-3)
            mm_rate = 2 * batch * m * m * n / (mm_ms * 1e-3)
            rows.append({"case": label, "shape": [batch, m, n], "dtype": name, "msign_ms": ns_ms,
                         "msign_tflops": ns_rate / 1e12, "matmul_ms": mm_ms, "matmul_tflops": mm_rate / 1e12,
                         "fraction_of_matmul": ns_rate / mm_rate})
    return {"rows": rows, "checks": [],
            "fp32_matmul_precision": torch.get_float32_matmul_precision()}
