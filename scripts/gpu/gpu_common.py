"""What every section of the GPU check shares: the run's sizes, a device timer, host-sync counting.

Kept free of Megatron so that the correctness and throughput sections run without it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the GPU sizes (Dense-1.7B shapes, SPEC §6) or tiny CPU ones."""

    msign_shapes: tuple[tuple[int, int], ...]
    """(rows, cols) of the msign-vs-SVD matrices: a per-head Q/K/V slice, attention proj, FFN."""
    step_shapes: tuple[tuple[int, int], ...]
    """(rows, cols) of the matrices of the CUDA-vs-CPU optimizer-step check (the CPU reference
    step must stay a few seconds, so the 2048 x 6144 FFN shape is replaced by 1024 x 3072)."""
    ns_single: tuple[int, int]
    """Newton-Schulz throughput shape of one matrix: the FFN's 2048 x 6144 (wide orientation)."""
    ns_batched: tuple[int, int, int]
    """(batch, rows, cols) of the batched throughput case: one layer's 16 Q heads, 8 K and
    8 V groups of 128 x 2048, updated together as same-shape atomic modules."""
    hidden: int
    """Model width (Dense-1.7B: 2048)."""
    heads: int
    """Attention heads (16)."""
    kv_groups: int
    """Key/value groups, GQA (8)."""
    ffn: int
    """SwiGLU FFN width (6144)."""
    seq: int
    """Sequence length in tokens (4096)."""
    vocab: int
    """Vocabulary of the synthetic data (not Qwen3's 151936: the check measures the layers,
    and a 150k x 2048 embedding and output layer would dominate a few-layer model)."""
    micro_batch: int
    """Sequences per step."""
    solver_steps: int
    """Optimizer steps of the solver-calls count (the first is cold)."""


GPU_SIZES = Sizes(
    msign_shapes=((128, 2048), (2048, 2048), (2048, 6144)),
    step_shapes=((128, 2048),) * 8 + ((2048, 2048), (1024, 3072)),
    ns_single=(2048, 6144), ns_batched=(32, 128, 2048),
    hidden=2048, heads=16, kv_groups=8, ffn=6144, seq=4096, vocab=16384, micro_batch=1, solver_steps=6,
)
CPU_SIZES = Sizes(
    msign_shapes=((8, 64), (64, 64), (64, 192)),
    step_shapes=((8, 64), (8, 64), (48, 144)),
    ns_single=(64, 192), ns_batched=(8, 16, 64),
    hidden=64, heads=4, kv_groups=2, ffn=192, seq=32, vocab=128, micro_batch=2, solver_steps=3,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` (CUDA events on a GPU,
    the host clock after a synchronisation elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with interval(device) as took:
            fn()
        times.append(took())
    return statistics.median(times)


@contextlib.contextmanager
def interval(device: torch.device) -> Iterator[Callable[[], float]]:
    """``with interval(dev) as took: ...; took()`` -> milliseconds the block took on ``dev``."""
    box: list[float] = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield lambda: box[0]
        end.record()
        end.synchronize()
        box.append(start.elapsed_time(end))
    else:
        t0 = time.perf_counter()
        yield lambda: box[0]
        box.append((time.perf_counter() - t0) * 1e3)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
"""Tensor methods that copy a value to the host; on a GPU each one waits for the device."""


@contextlib.contextmanager
def count_host_reads(device: torch.device) -> Iterator[dict[str, int]]:
    """Count calls of :data:`HOST_READS` on tensors that live on ``device`` while the block runs.

    Device-independent (it works on the CPU too): a host read of a device tensor is what forces a
    synchronisation on a GPU. Tensors kept on the host on purpose (a CPU step counter beside CUDA
    weights) are not counted on a GPU; on the CPU dry run everything is on the host, so there the
    count is an upper bound.
    """
    counts = {name: 0 for name in HOST_READS}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if self.device.type == device.type:
                counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_cuda_syncs() -> Iterator[dict[str, int]]:
    """Count torch's synchronising CUDA calls in the block with ``torch.cuda.set_sync_debug_mode
    ("warn")``: torch warns once per call that waits for the device (``.item()``, a device-to-host
    copy, ``nonzero``...). CUDA only."""
    out = {"warnings": 0, "examples": []}
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield out
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synced = [w for w in caught if "synchroniz" in str(w.message).lower()]
    out["warnings"] = len(synced)
    out["examples"] = sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in synced})[:8]


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""CUDA runtime calls the profiler records when the host waits for the device."""


def profile_syncs(fn: Callable[[], object]) -> dict[str, int]:
    """Count the profiler's host-waiting runtime calls (:data:`SYNC_EVENTS`) and device-to-host
    copies while ``fn()`` runs once. CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    counts = {name: 0 for name in SYNC_EVENTS}
    counts["memcpy_dtoh"] = 0
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
        elif "dtoh" in event.name.lower().replace(" ", "").replace("devicetohost", "dtoh"):
            counts["memcpy_dtoh"] += 1
    return counts


def check(name: str, value: float, limit: float, *, below: bool = True) -> dict:
    """One pass/fail record: ``value`` must be ``<= limit`` (``below``) or ``>= limit``."""
    ok = bool(value <= limit) if below else bool(value >= limit)
    return {"check": name, "value": float(value), "limit": float(limit),
            "rule": "<=" if below else ">=", "passed": ok}
