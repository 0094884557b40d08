"""Preloaded by the forkserver that :func:`.bridge_runner.run_pretrain` uses.

Importing Megatron-Bridge's training stack costs ~10 s of CPU per process. The forkserver
imports it once (after enabling CPU mode, a no-op with CUDA) and every rank is then forked
from it, already initialised. An ImportError here is ignored by the forkserver; the ranks
then import what they need themselves.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron_sso.mcore.cpu import enable_cpu_mode

    enable_cpu_mode()
    import megatron.bridge.models.gpt_provider  # noqa: F401,E402
    import megatron.bridge.training.gpt_step  # noqa: F401,E402
    import megatron.bridge.training.pretrain  # noqa: F401,E402
