"""CPU mode on a helper thread must not abort the process at interpreter exit.

Root cause (see :mod:`megatron_sso.mcore.cpu.devices`): torch keeps a thread's TorchFunctionMode
stack in C++ thread-local storage. When a thread ends, that storage is destroyed after the
thread's Python state, and dropping the mode's Python reference needs the GIL. If the main
thread has started finalising the interpreter when the helper thread gets the GIL, CPython ends
the helper thread inside the noexcept destructor: "terminate called without an active
exception", exit code 134. It used to happen now and then under load.

The script below makes that order likely: a long switch interval keeps the GIL with the main
thread (the helpers' destructors wait for it), and an object whose ``__del__`` sleeps during
teardown hands the GIL over only after finalisation has begun. Without the fix (the mode left
on the helper threads) it aborted in 5 of 6 runs here; with it, the helpers leave the mode
while their Python state is cleared and nothing is left to drop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from test_cpu_mode import CUDA_FREE

SCRIPT = """
import sys, threading, time
import torch
from megatron_sso.mcore.cpu.mode import enable_cpu_mode

enable_cpu_mode()

class SlowTeardown:
    def __del__(self, sleep=time.sleep):
        sleep(0.5)  # releases the GIL while the interpreter is finalising

keep = SlowTeardown()
seen = []

def worker():
    enable_cpu_mode()
    seen.append(torch.zeros(1, device="cuda").device.type)

sys.setswitchinterval(30.0)  # a thread waiting for the GIL gets it only when main blocks
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert seen == ["cpu"] * 4, seen
"""


@CUDA_FREE
def test_thread_that_entered_cpu_mode_does_not_abort_at_exit():
    for attempt in range(3):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, (attempt, proc.returncode, proc.stderr[-3000:])
        assert "terminate called" not in proc.stderr
