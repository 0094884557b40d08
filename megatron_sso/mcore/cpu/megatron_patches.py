"""CPU mode's patches of Megatron modules (megatron-core 0.16.1, Megatron-Bridge 0.3.1).

Each patch takes the module it fixes and is applied by :mod:`.cpu_mode`'s import hook right
after that module is imported (or at once if it already is), so switching CPU mode on imports
nothing heavy. :data:`MODULE_PATCHES` lists them; each docstring says which Megatron
behaviour it bridges and why. The torch-level patches, the entry point and the report live in
:mod:`.cpu_mode`; the device mode in :mod:`.cpu_devices`. Nothing here is applied on import.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import logging
import types
from typing import Any, Callable

import torch

from megatron_sso.mcore.cpu.import_hooks import ModulePatch

__all__ = ["CUDA_GRAPHS_LINE", "MODULE_PATCHES", "NotApplicable", "bridge_initialize_without_cuda",
           "bridge_quiet_cuda_graph_cleanup", "bridge_seed_rng_tracker",
           "bridge_skip_jit_warmup", "cuda_rng_tracker_on_cpu", "define_te_general_gemm", "named",
           "skip_compile_helpers_when_prebuilt", "torch_norm_sequence_parallel"]


class NotApplicable(Exception):
    """Raised by a patch that has nothing to do in this environment (recorded as skipped)."""


def named(name: str, fn: Callable) -> Callable:
    """``fn`` renamed ``name``: a stand-in shows the name of what it replaces in tracebacks."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def cuda_rng_tracker_on_cpu(mrandom: types.ModuleType) -> None:
    """``megatron.core.tensor_parallel.random`` swaps tracker states with its own
    ``_get/_set_cuda_rng_state`` (they index ``torch.cuda.default_generators``): point
    them at the CPU generator. Because the "CUDA" generator *is* the CPU one here, the
    tracker's "CPU RNG state changed within GPU RNG context" warning is expected; it is
    filtered out."""
    mrandom._get_cuda_rng_state = named(
        "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mrandom._set_cuda_rng_state = named(
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
        raise NotApplicable("te_general_gemm is defined")
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
    binit._warmup_jit_function = named("_warmup_jit_function", lambda *args, **kwargs: None)


CUDA_GRAPHS_LINE = "Deleting CUDA graphs"
"""What Bridge 0.3.1's training loop prints at the end of every run (``_delete_cuda_graphs``)."""


def bridge_quiet_cuda_graph_cleanup(btrain: types.ModuleType) -> None:
    """Bridge's ``train()`` ends by printing "Deleting CUDA graphs" and freeing them, whether or
    not any were captured; on a CPU there are none, so the line only misleads. Drop exactly that
    line from the module's ``print_rank_0``; every other message passes through."""
    say = btrain.print_rank_0

    def print_rank_0(message: str) -> None:
        if message != CUDA_GRAPHS_LINE:
            say(message)

    btrain.print_rank_0 = named("print_rank_0", print_rank_0)


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


#: (module, patch): applied when ``module`` is imported (or at once if it already is).
MODULE_PATCHES: tuple[tuple[str, ModulePatch], ...] = (
    ("megatron.core.tensor_parallel.random", cuda_rng_tracker_on_cpu),
    ("megatron.core.transformer.moe.moe_utils", define_te_general_gemm),
    ("megatron.core.datasets.utils", skip_compile_helpers_when_prebuilt),
    ("megatron.core.transformer.torch_norm", torch_norm_sequence_parallel),
    ("megatron.bridge.training.initialize", skip_compile_helpers_when_prebuilt),
    ("megatron.bridge.training.initialize", bridge_seed_rng_tracker),
    ("megatron.bridge.training.initialize", bridge_skip_jit_warmup),
    ("megatron.bridge.training.setup", bridge_initialize_without_cuda),
    ("megatron.bridge.training.train", bridge_quiet_cuda_graph_cleanup),
)
