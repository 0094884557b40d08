"""CPU mode: train with Megatron-Core 0.16.1 and Megatron-Bridge 0.3.1 on a CPU with gloo.

Megatron assumes a CUDA device everywhere: it allocates with ``device="cuda"`` or
``device=torch.cuda.current_device()``, calls ``tensor.cuda()``, synchronises streams,
seeds a "CUDA" RNG tracker and checks ``param.type() == "torch.cuda.FloatTensor"``. A
CPU-only torch build raises on all of these. CPU mode bridges them so that the *real*
Megatron code paths (model construction, Megatron DDP, ``get_megatron_optimizer``,
Bridge's ``pretrain()`` loop) run unchanged on a CPU, which is what the project's CPU
test suite and CPU-sized recipes rely on.

Design
------
* One entry point, :func:`enable_cpu_mode`. It changes nothing and returns False when
  ``torch.cuda.is_available()``, so a GPU run is never altered. On a CPU it applies every
  patch once per process (idempotent, thread-safe) and returns True.
* Each patch is a small named function (here or in :mod:`.cpu_megatron_patches`); its
  docstring says which Megatron behaviour it bridges and why. :func:`cpu_mode_report` lists what was applied, what
  waits for its module to be imported, and what was skipped (e.g. TE is installed).
* Torch-level patches (:data:`_TORCH_PATCHES`, here) apply at once. Patches of Megatron
  modules (:data:`~.cpu_megatron_patches.MODULE_PATCHES`, in :mod:`.cpu_megatron_patches`)
  run right after that module is imported, through an
  import hook, or at once if it already is: enabling CPU mode imports nothing heavy, and
  works whether it is called before or after Megatron is imported. The exception is
  the transformer-engine stubs for Bridge, which must be installed before
  ``megatron.bridge`` is imported: call :func:`enable_cpu_mode` first.
* Device placement goes through a ``TorchFunctionMode``
  (:class:`~megatron_sso.mcore.cpu.devices.CudaToCpuMode`), not by editing Megatron.
  ``torch.cuda.is_available()`` and ``device_count()`` keep telling the truth (False, 0),
  so Megatron still takes its own "no GPU" branches and refuses NCCL.
* Patches are process-wide and not undone: Megatron binds many names at import time, so
  CPU mode is meant to be switched on once, at the start of a training process.

Limitation: a ``TorchFunctionMode`` is thread-local. It is active on the threads that
called :func:`enable_cpu_mode` and in every backward pass started from them (and survives
``fork``); Megatron features that allocate on their own helper threads (asynchronous
checkpoint saving) are not covered.

Thread exit: a thread other than the main one leaves the mode again as it ends, so that torch's
C++ thread-local destructor has no Python reference left to drop while the interpreter
finalises (which aborted the process now and then); see :mod:`.cpu_devices`.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.overrides import _get_current_function_mode_stack

from megatron_sso.mcore.cpu.devices import CudaToCpuMode, HostEvent, HostStream, enter_on_this_thread
from megatron_sso.mcore.cpu.megatron_patches import (  # noqa: F401  (public names stay importable here)
    MODULE_PATCHES, NotApplicable, bridge_initialize_without_cuda, bridge_seed_rng_tracker, bridge_skip_jit_warmup,
    cuda_rng_tracker_on_cpu, define_te_general_gemm, named, skip_compile_helpers_when_prebuilt,
    torch_norm_sequence_parallel)
from megatron_sso.mcore.cpu.import_hooks import ImportHook, ModulePatch

__all__ = ["BRIDGE_TE_MODULES", "CpuModeReport", "cpu_mode_enabled", "cpu_mode_report", "enable_cpu_mode"]

#: Megatron-Bridge 0.3.1 modules that import transformer_engine unconditionally.
BRIDGE_TE_MODULES = (
    "megatron.bridge.peft.lora_layers",
    "megatron.bridge.peft.lora",
    "megatron.bridge.models.gpt_full_te_layer_autocast_spec",
)


# --------------------------------------------------------------------------- torch patches


def stub_bridge_te_modules() -> None:
    """Let ``megatron.bridge`` import without transformer-engine.

    Bridge 0.3.1 imports ``transformer_engine.pytorch`` at module level in its LoRA
    modules and its full-TE layer spec (:data:`BRIDGE_TE_MODULES`); the LoRA module is
    reached from ``megatron.bridge.training.pretrain``. The import hook serves stubs for
    these three whose names resolve to placeholder classes that raise when instantiated.
    ``transformer_engine`` itself is *not* faked, so Megatron-Core keeps ``HAVE_TE=False``
    and uses its local implementations.
    """
    if importlib.util.find_spec("transformer_engine") is not None:
        raise NotApplicable("transformer_engine is importable")
    if any(name in sys.modules for name in BRIDGE_TE_MODULES):
        raise NotApplicable("Bridge's TE modules are already imported")
    for name in BRIDGE_TE_MODULES:
        _HOOK.stub(name, "needs transformer-engine, which is not installed (CPU mode stub)")


def stub_absent_modules() -> None:
    """Serve the modules a supported Megatron release imports unconditionally although the
    lock leaves their distribution out (:func:`megatron_sso.mcore.compat.absent_module_stubs`:
    nvidia-resiliency-ext for Megatron-Bridge 0.6's ``pretrain.py``) as stubs whose names raise
    when instantiated. Like :func:`stub_bridge_te_modules`, before ``megatron.bridge`` is imported."""
    from megatron_sso.mcore.compat import absent_module_stubs

    stubs = absent_module_stubs()
    if not stubs:
        raise NotApplicable("no absent module is imported by the installed releases")
    for name, why, package in stubs:
        _HOOK.stub(name, f"{why} (CPU mode stub)", package=package)


def redirect_cuda_devices() -> None:
    """Enter :class:`CudaToCpuMode` on the calling thread, for good: Megatron's
    ``device="cuda"`` / ``device=torch.cuda.current_device()`` allocations, ``.cuda()``,
    ``.to("cuda")`` and ``pin_memory()`` land on the CPU, and its
    ``param.type() == "torch.cuda.FloatTensor"`` checks (optimizer wrappers, grad
    clipping) see the CUDA type names they require."""
    global _MODE
    _MODE = CudaToCpuMode()
    enter_on_this_thread(_MODE)


def noop_device_management() -> None:
    """Host versions of the ``torch.cuda`` device API that Megatron calls unconditionally:
    ``synchronize`` (timers, barriers), ``set_device`` (rank setup), ``empty_cache``,
    ``current_device`` (index 0, which the mode maps to the CPU) and the memory statistics
    it logs (all zero). ``is_available`` and ``device_count`` are left untouched."""
    c = torch.cuda
    c.synchronize = named("synchronize", lambda device=None: None)
    c.set_device = named("set_device", lambda device: None)
    c.empty_cache = named("empty_cache", lambda: None)
    c.current_device = named("current_device", lambda: 0)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(c, name, named(name, lambda device=None: 0))
    c.memory_stats = named("memory_stats", lambda device=None: {})
    c.reset_peak_memory_stats = named("reset_peak_memory_stats", lambda device=None: None)


def host_streams_and_events() -> None:
    """``torch.cuda.Stream/Event/current_stream/default_stream/stream/set_stream`` on the
    host: Megatron's DDP, schedules and optimizers create, record and wait on streams and
    events; on a CPU every operation is already ordered, so these do nothing."""
    c = torch.cuda
    c.Stream, c.Event = HostStream, HostEvent
    c.current_stream = named("current_stream", lambda device=None: HostStream())
    c.default_stream = named("default_stream", lambda device=None: HostStream())
    c.stream = named("stream", lambda stream=None: torch.cpu.StreamContext(None))
    c.set_stream = named("set_stream", lambda stream: None)


def flush_subnormals() -> None:
    """Flush subnormal floats to zero on the CPU (``torch.set_flush_denormal(True)``).

    Not a CUDA bridge but a CPU one: the iterates of Newton-Schulz and power iteration can
    underflow into subnormal numbers, which x86 cores process ~100x slower, and a training
    step then stalls for seconds at random (measured by the launch work: 20 SSO steps took
    42.7 s with subnormals, 6.7 s without). GPUs flush them in their fast paths already.
    """
    torch.set_flush_denormal(True)


def cuda_rng_on_cpu_generator() -> None:
    """``torch.cuda.manual_seed/get_rng_state/set_rng_state`` act on the CPU generator.

    Megatron's ``CudaRNGStatesTracker`` (TP weight init, dropout) creates each tracked
    state by seeding and reading the CUDA generator through these; on a CPU they act on
    the CPU default generator instead, so every tracked state is a distinct CPU generator
    state and ``fork()`` swaps them as it would on a GPU. (See also
    :func:`cuda_rng_tracker_on_cpu` and :func:`bridge_seed_rng_tracker`.)
    """
    c = torch.cuda

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    c.manual_seed = manual_seed
    c.get_rng_state = named("get_rng_state", lambda device="cuda": torch.get_rng_state())
    c.set_rng_state = named("set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))


#: Applied at once, in order.
_TORCH_PATCHES: tuple[Callable[[], None], ...] = (
    stub_bridge_te_modules,
    stub_absent_modules,
    redirect_cuda_devices,
    noop_device_management,
    host_streams_and_events,
    cuda_rng_on_cpu_generator,
    flush_subnormals,
)


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class CpuModeReport:
    """What CPU mode did in this process: ``applied`` patches (module patches as
    ``"name (module)"``), ``pending`` module patches waiting for their module's import,
    and ``skipped`` patches with the reason."""

    enabled: bool
    applied: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)


def _record(name: str, patch: Callable[[], None]) -> None:
    try:
        patch()
    except NotApplicable as exc:
        _SKIPPED[name] = str(exc)
    else:
        _APPLIED.append(name)


def _apply_module_patch(patch: ModulePatch, module: types.ModuleType) -> None:
    _record(f"{patch.__name__} ({module.__name__})", lambda: patch(module))


_LOCK = threading.RLock()
_HOOK = ImportHook(_apply_module_patch)
_MODE: CudaToCpuMode | None = None
_ENABLED = False
_APPLIED: list[str] = []
_SKIPPED: dict[str, str] = {}


def enable_cpu_mode() -> bool:
    """Switch on CPU mode for this process if no CUDA device is available.

    Returns True when CPU mode is in effect (applied now or by an earlier call) and False
    when ``torch.cuda.is_available()``, in which case nothing is changed. Call it before
    ``megatron.bridge`` is imported, and on every thread that runs Megatron code: a later
    call only activates the device mode on the calling thread.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ENABLED:
            if _MODE is not None and _MODE not in _get_current_function_mode_stack():
                enter_on_this_thread(_MODE)
            return True
        _ENABLED = True  # a patch that raises is not retried by a later call
        for patch in _TORCH_PATCHES:
            _record(patch.__name__, patch)
        _HOOK.install()
        for module_name, module_patch in MODULE_PATCHES:
            _HOOK.after_import(module_name, module_patch)
    return True


def add_module_patches(patches: tuple[tuple[str, ModulePatch], ...]) -> None:
    """Register more ``(module, patch)`` pairs with CPU mode's import hook, each once (e.g.
    Megatron-LM's, :mod:`.cpu_mode_megatron_lm`; kept apart so that a Bridge process has no
    patch pending for modules it never imports). Does nothing unless CPU mode is enabled."""
    with _LOCK:
        if not _ENABLED:
            return
        for module_name, module_patch in patches:
            if (module_name, module_patch) not in _EXTRA:
                _EXTRA.append((module_name, module_patch))
                _HOOK.after_import(module_name, module_patch)


_EXTRA: list[tuple[str, ModulePatch]] = []


def cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` has switched CPU mode on in this process."""
    return _ENABLED


def cpu_mode_report() -> CpuModeReport:
    """Which patches CPU mode applied, which wait for an import, which were skipped."""
    with _LOCK:
        pending = tuple(f"{p.__name__} ({m})" for m, ps in _HOOK.pending.items() for p in ps)
        return CpuModeReport(_ENABLED, tuple(_APPLIED), pending, dict(_SKIPPED))
