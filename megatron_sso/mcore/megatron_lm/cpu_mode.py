"""CPU mode for Megatron-LM's own training loop (``megatron.training``, tag core_v0.16.1).

:mod:`.cpu_mode` bridges megatron-core and Megatron-Bridge; Megatron-LM's ``pretrain()`` has
a few more CUDA assumptions of its own, bridged here. They are registered with CPU mode's
import hook only by :func:`enable_megatron_lm_cpu_mode` (the Megatron-LM launcher calls it), so
a Bridge process keeps no patch pending for modules it never imports. Like CPU mode, nothing
changes when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from ..cpu import bridge_initialize_without_cuda, bridge_skip_jit_warmup
from ..cpu import add_module_patches, enable_cpu_mode


def megatron_lm_initialize_without_cuda(training: types.ModuleType) -> None:
    """``pretrain()`` calls ``initialize_megatron`` without ``allow_no_cuda``, which asserts
    ``torch.cuda.is_available()``: pass ``allow_no_cuda=True`` (the rest of its set-up already
    handles zero devices: no ``set_device``, gloo groups). Patched in ``megatron.training.training``,
    which imported the name directly. Same wrapper as Bridge's ``setup``."""
    bridge_initialize_without_cuda(training)


def _seeing_one_device(original):
    """``original`` run with ``torch.cuda.device_count()`` answering 1 when it is 0 (unchanged on
    a machine with CUDA devices)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any):
        real = torch.cuda.device_count
        if real() > 0:
            return original(*args, **kwargs)
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = real

    return wrapper


def megatron_lm_model_parallel_groups(initialize: types.ModuleType) -> None:
    """``_initialize_distributed`` creates the model-parallel groups (``initialize_model_parallel``)
    only when ``torch.cuda.device_count() > 0``; with none, the first ``mpu`` query fails
    ("pipeline_model parallel group is not initialized"). Let it see one device while it runs:
    its only other use of the count is ``torch.cuda.set_device`` (a no-op in CPU mode) and a
    device id for the in-process-restart NCCL warm-up, off unless ``--inprocess-restart``. The
    groups use the default backend (gloo), as the Bridge path's do. Same in core_v0.16.1 and 0.19."""
    initialize._initialize_distributed = _seeing_one_device(initialize._initialize_distributed)


def megatron_lm_seed_rng_tracker(initialize: types.ModuleType) -> None:
    """``_set_random_seed`` seeds the model-parallel RNG tracker only when
    ``torch.cuda.device_count() > 0``; with no device the tracker stays empty and the first
    ``get_cuda_rng_tracker().fork()`` (weight init, dropout) fails. Let it see one device while
    it runs, so that it seeds the tracker exactly as on a GPU, with whatever arguments its
    release passes (core_v0.16.1 passes the seed and four flags; 0.19 also this rank's tensor,
    expert and expert-tensor ranks): the count is its only device query, and CPU mode points
    the tracker at the CPU generator."""
    initialize._set_random_seed = _seeing_one_device(initialize._set_random_seed)


def megatron_lm_skip_fused_kernels(fused_kernels: types.ModuleType) -> None:
    """``_compile_dependencies`` always calls ``megatron.legacy.fused_kernels.load``, which runs
    ``$CUDA_HOME/bin/nvcc -V`` (``CUDA_HOME`` is None without a CUDA toolkit) to pick CUDA kernel
    architectures. There are no CUDA kernels to load on a CPU: make it a no-op."""
    fused_kernels.load = lambda args: None


def megatron_lm_device_arch(arguments: types.ModuleType) -> None:
    """``validate_args`` asks ``get_device_arch_version()`` (``torch.cuda.get_device_properties``)
    when tensor or context parallelism is on, only to choose which performance warning to print.
    Report architecture 0 (older than any GPU) on a CPU."""
    arguments.get_device_arch_version = lambda: 0


MEGATRON_LM_PATCHES = (
    ("megatron.training.training", megatron_lm_initialize_without_cuda),
    ("megatron.training.initialize", megatron_lm_model_parallel_groups),
    ("megatron.training.initialize", megatron_lm_seed_rng_tracker),
    ("megatron.training.initialize", bridge_skip_jit_warmup),
    ("megatron.training.arguments", megatron_lm_device_arch),
    ("megatron.legacy.fused_kernels", megatron_lm_skip_fused_kernels),
)
"""(module, patch) pairs, applied when the module is imported. ``bridge_skip_jit_warmup``
serves Megatron-LM as is: its ``set_jit_fusion_options`` has the same CUDA-shaped warm-up."""


def enable_megatron_lm_cpu_mode() -> bool:
    """:func:`~.cpu_mode.enable_cpu_mode` plus the Megatron-LM patches; False (nothing changed)
    when CUDA is available."""
    if not enable_cpu_mode():
        return False
    add_module_patches(MEGATRON_LM_PATCHES)
    return True
