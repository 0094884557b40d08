"""Megatron-Core and Megatron-Bridge on a CPU with gloo (no GPU, no Transformer Engine).

``enable_cpu_mode()`` (:mod:`.mode`) maps CUDA calls to the host (:mod:`.devices`), stubs what
Bridge hard-imports from Transformer Engine, and patches Megatron modules as they are imported
(:mod:`.import_hooks`, the patches in :mod:`.megatron_patches`); a no-op where CUDA is available.
Of the other rooms it uses only :mod:`..compat` (which absent modules to stub). Callers: the CLI, the Bridge runner and its forkserver
preload, the Megatron-LM CPU glue, tests.
"""

from .. import lazy_face

FACE = {
    "mode": ("enable_cpu_mode", "cpu_mode_enabled", "cpu_mode_report", "add_module_patches", "CpuModeReport"),
    "megatron_patches": ("bridge_initialize_without_cuda", "bridge_skip_jit_warmup",
                         "skip_compile_helpers_when_prebuilt"),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
