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
* Each patch is a small named function below; its docstring says which Megatron
  behaviour it bridges and why. :func:`cpu_mode_report` lists what was applied, what
  waits for its module to be imported, and what was skipped (e.g. TE is installed).
* Torch-level patches (:data:`_TORCH_PATCHES`) apply at once. Patches of Megatron
  modules (:data:`_MODULE_PATCHES`) run right after that module is imported, through an
  import hook, or at once if it already is: enabling CPU mode imports nothing heavy, and
  works whether it is called before or after Megatron is imported. The exception is
  the transformer-engine stubs for Bridge, which must be installed before
  ``megatron.bridge`` is imported: call :func:`enable_cpu_mode` first.
* Device placement goes through a ``TorchFunctionMode``
  (:class:`~megatron_sso.mcore.cpu_devices.CudaToCpuMode`), not by editing Megatron.
  ``torch.cuda.is_available()`` and ``device_count()`` keep telling the truth (False, 0),
  so Megatron still takes its own "no GPU" branches and refuses NCCL.
* Patches are process-wide and not undone: Megatron binds many names at import time, so
  CPU mode is meant to be switched on once, at the start of a training process.

Limitation: a ``TorchFunctionMode`` is thread-local. It is active on the threads that
called :func:`enable_cpu_mode` and in every backward pass started from them (and survives
``fork``); Megatron features that allocate on their own helper threads (asynchronous
checkpoint saving) are not covered.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import _get_current_function_mode_stack

from megatron_sso.mcore.cpu_devices import CudaToCpuMode, HostEvent, HostStream
from megatron_sso.mcore.import_hooks import ImportHook, ModulePatch

__all__ = ["BRIDGE_TE_MODULES", "CpuModeReport", "cpu_mode_enabled", "cpu_mode_report", "enable_cpu_mode"]

#: Megatron-Bridge 0.3.1 modules that import transformer_engine unconditionally.
BRIDGE_TE_MODULES = (
    "megatron.bridge.peft.lora_layers",
    "megatron.bridge.peft.lora",
    "megatron.bridge.models.gpt_full_te_layer_autocast_spec",
)


class _NotApplicable(Exception):
    """Raised by a patch that has nothing to do in this environment."""


def _named(name: str, fn: Callable) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


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
        raise _NotApplicable("transformer_engine is importable")
    if any(name in sys.modules for name in BRIDGE_TE_MODULES):
        raise _NotApplicable("Bridge's TE modules are already imported")
    for name in BRIDGE_TE_MODULES:
        _HOOK.stub(name, "needs transformer-engine, which is not installed (CPU mode stub)")


def redirect_cuda_devices() -> None:
    """Enter :class:`CudaToCpuMode` on the calling thread, for good: Megatron's
    ``device="cuda"`` / ``device=torch.cuda.current_device()`` allocations, ``.cuda()``,
    ``.to("cuda")`` and ``pin_memory()`` land on the CPU, and its
    ``param.type() == "torch.cuda.FloatTensor"`` checks (optimizer wrappers, grad
    clipping) see the CUDA type names they require."""
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def noop_device_management() -> None:
    """Host versions of the ``torch.cuda`` device API that Megatron calls unconditionally:
    ``synchronize`` (timers, barriers), ``set_device`` (rank setup), ``empty_cache``,
    ``current_device`` (index 0, which the mode maps to the CPU) and the memory statistics
    it logs (all zero). ``is_available`` and ``device_count`` are left untouched."""
    c = torch.cuda
    c.synchronize = _named("synchronize", lambda device=None: None)
    c.set_device = _named("set_device", lambda device: None)
    c.empty_cache = _named("empty_cache", lambda: None)
    c.current_device = _named("current_device", lambda: 0)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(c, name, _named(name, lambda device=None: 0))
    c.memory_stats = _named("memory_stats", lambda device=None: {})
    c.reset_peak_memory_stats = _named("reset_peak_memory_stats", lambda device=None: None)


def host_streams_and_events() -> None:
    """``torch.cuda.Stream/Event/current_stream/default_stream/stream/set_stream`` on the
    host: Megatron's DDP, schedules and optimizers create, record and wait on streams and
    events; on a CPU every operation is already ordered, so these do nothing."""
    c = torch.cuda
    c.Stream, c.Event = HostStream, HostEvent
    c.current_stream = _named("current_stream", lambda device=None: HostStream())
    c.default_stream = _named("default_stream", lambda device=None: HostStream())
    c.stream = _named("stream", lambda stream=None: torch.cpu.StreamContext(None))
    c.set_stream = _named("set_stream", lambda stream: None)


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
    c.get_rng_state = _named("get_rng_state", lambda device="cuda": torch.get_rng_state())
    c.set_rng_state = _named("set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))


# --------------------------------------------------------------------------- module patches


def cuda_rng_tracker_on_cpu(mrandom: types.ModuleType) -> None:
    """``megatron.core.tensor_parallel.random`` swaps tracker states with its own
    ``_get/_set_cuda_rng_state`` (they index ``torch.cuda.default_generators``): point
    them at the CPU generator. Because the "CUDA" generator *is* the CPU one here, the
    tracker's "CPU RNG state changed within GPU RNG context" warning is expected; it is
    filtered out."""
    mrandom._get_cuda_rng_state = _named(
        "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mrandom._set_cuda_rng_state = _named(
        "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    logging.getLogger(mrandom.__name__).addFilter(_SameGeneratorWarningFilter())


class _SameGeneratorWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def define_te_general_gemm(moe_utils: types.ModuleType) -> None:
    """megatron-core 0.16.1 bug: ``moe_utils`` binds ``te_general_gemm`` only inside its
    ``try: import transformer_engine`` block but reads it in the router's gating GEMM
    (used when ``moe_router_dtype`` is set, e.g. the fp32 router of the MoE recipe), so
    that path raises ``NameError`` without TE. Bind it to None, which its fallback expects."""
    if hasattr(moe_utils, "te_general_gemm"):
        raise _NotApplicable("te_general_gemm is defined")
    moe_utils.te_general_gemm = None


def skip_compile_helpers_when_prebuilt(module: types.ModuleType) -> None:
    """The megatron-core wheel ships a prebuilt ``megatron.core.datasets.helpers_cpp`` but
    no Makefile, while Bridge's ``initialize_megatron`` (and Megatron-LM) always run
    ``compile_helpers()`` (a ``make``) and exit when it fails. Compile only when the
    prebuilt extension does not import. Applied to ``megatron.core.datasets.utils`` and to
    Bridge's ``initialize`` module, which imported the name directly."""
    original = module.compile_helpers
    if getattr(original, "_megatron_sso_cpu_mode", False):
        return
    original = _ORIGINAL_COMPILE_HELPERS.setdefault("fn", original)

    @functools.wraps(original)
    def compile_helpers() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()

    compile_helpers._megatron_sso_cpu_mode = True
    module.compile_helpers = compile_helpers


_ORIGINAL_COMPILE_HELPERS: dict[str, Callable[[], None]] = {}


def bridge_initialize_without_cuda(setup: types.ModuleType) -> None:
    """Bridge's ``setup()`` calls ``initialize_megatron(cfg)`` without ``allow_no_cuda``,
    which asserts ``torch.cuda.is_available()``. Pass ``allow_no_cuda=True``; the rest of
    its initialisation already handles zero devices (gloo process groups)."""
    original = setup.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    setup.initialize_megatron = initialize_megatron


def bridge_seed_rng_tracker(binit: types.ModuleType) -> None:
    """Bridge's ``_set_random_seed`` seeds the model-parallel RNG tracker only when
    ``torch.cuda.device_count() > 0``; with no device the tracker stays empty and the first
    ``get_cuda_rng_tracker().fork()`` (TP weight init, dropout) fails. After the original
    has seeded torch (``torch.initial_seed()`` is then the per-stage seed it computed), call
    ``model_parallel_cuda_manual_seed`` with the same arguments as it would on a GPU."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_pg_rank

    original = binit._set_random_seed
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _set_random_seed(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        if torch.cuda.device_count() > 0:
            return
        a = signature.bind(*args, **kwargs)
        a.apply_defaults()
        arg, pgs = a.arguments, a.arguments["pg_collection"]
        tensor_parallel.model_parallel_cuda_manual_seed(
            torch.initial_seed(), arg["te_rng_tracker"], arg["inference_rng_tracker"],
            arg["use_cudagraphable_rng"], tp_rank=get_pg_rank(pgs.tp),
            ep_rank=get_pg_rank(pgs.ep), etp_rank=get_pg_rank(pgs.expt_tp),
        )

    binit._set_random_seed = _set_random_seed


def bridge_skip_jit_warmup(binit: types.ModuleType) -> None:
    """Bridge's ``set_jit_fusion_options`` warms up the fused bias-GeLU/SwiGLU and
    bias-dropout-add kernels with ``torch.compile`` on CUDA-shaped inputs so that the
    first GPU step does not pay for compilation. On a CPU that is several seconds of
    Inductor C++ compilation per process for kernels the step only uses when those fusions
    are enabled (they then compile on first use anyway): skip the warmup."""
    binit._warmup_jit_function = _named("_warmup_jit_function", lambda *args, **kwargs: None)


def torch_norm_sequence_parallel(torch_norm: types.ModuleType) -> None:
    """Without TE or Apex, Megatron's local layer spec builds norms with
    ``WrappedTorchNorm``, which asserts ``not config.sequence_parallel``; but MoE with
    TP > 1 requires sequence parallelism. A norm is elementwise over the hidden dimension,
    so it is correct on sequence-sharded input: build it as usual and mark its parameters
    ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces their gradients
    over the tensor-parallel group, as it does for TE's norms."""
    cls = torch_norm.WrappedTorchNorm
    original = cls.__new__

    @functools.wraps(original)
    def __new__(klass, config, *args: Any, **kwargs: Any):
        if not getattr(config, "sequence_parallel", False):
            return original(klass, config, *args, **kwargs)
        unsharded = copy.copy(config)
        unsharded.sequence_parallel = False
        norm = original(klass, unsharded, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    cls.__new__ = __new__


#: Applied at once, in order.
_TORCH_PATCHES: tuple[Callable[[], None], ...] = (
    stub_bridge_te_modules,
    redirect_cuda_devices,
    noop_device_management,
    host_streams_and_events,
    cuda_rng_on_cpu_generator,
    flush_subnormals,
)

#: (module, patch): applied when ``module`` is imported (or at once if it already is).
_MODULE_PATCHES: tuple[tuple[str, ModulePatch], ...] = (
    ("megatron.core.tensor_parallel.random", cuda_rng_tracker_on_cpu),
    ("megatron.core.transformer.moe.moe_utils", define_te_general_gemm),
    ("megatron.core.datasets.utils", skip_compile_helpers_when_prebuilt),
    ("megatron.core.transformer.torch_norm", torch_norm_sequence_parallel),
    ("megatron.bridge.training.initialize", skip_compile_helpers_when_prebuilt),
    ("megatron.bridge.training.initialize", bridge_seed_rng_tracker),
    ("megatron.bridge.training.initialize", bridge_skip_jit_warmup),
    ("megatron.bridge.training.setup", bridge_initialize_without_cuda),
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
    except _NotApplicable as exc:
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
                _MODE.__enter__()
            return True
        _ENABLED = True  # a patch that raises is not retried by a later call
        for patch in _TORCH_PATCHES:
            _record(patch.__name__, patch)
        _HOOK.install()
        for module_name, module_patch in _MODULE_PATCHES:
            _HOOK.after_import(module_name, module_patch)
    return True


def cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` has switched CPU mode on in this process."""
    return _ENABLED


def cpu_mode_report() -> CpuModeReport:
    """Which patches CPU mode applied, which wait for an import, which were skipped."""
    with _LOCK:
        pending = tuple(f"{p.__name__} ({m})" for m, ps in _HOOK.pending.items() for p in ps)
        return CpuModeReport(_ENABLED, tuple(_APPLIED), pending, dict(_SKIPPED))
