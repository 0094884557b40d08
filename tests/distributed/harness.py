"""Spawn a gloo process group on 127.0.0.1 and collect each rank's results.

One spawn per test file (module-scoped fixture): a spawn costs ~3 s on 2 cores, the checks
inside cost less. The port comes from binding port 0, so parallel runs do not collide.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable[[int, int], dict]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result: Any = fn(rank, world)
    except Exception:  # report, then let the others fail on their own collectives
        result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        raise
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run(fn: Callable[[int, int], dict], world: int) -> list[dict]:
    """Run ``fn(rank, world)`` on ``world`` processes; return each rank's dict."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(world, free_port(), outdir, fn), nprocs=world,
                           join=True, start_method="spawn")
        # Our own workers wrote these files into a private temporary directory.
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
