"""Megatron-Bridge's real ``pretrain()`` for our runs and tests.

:mod:`.runner` builds a tiny GPT ``ConfigContainer`` (:class:`TinyGPTSpec`) and runs it in N local
ranks (spawned through a forkserver that has imported Bridge once, :mod:`.preload`), collecting
losses and probes; :mod:`.layer_specs` picks the layer spec (MoE layer pattern included);
:mod:`.qwen3` builds a Qwen3-style model provider on every Bridge release. Callers:
the CLI launcher, tests, scripts.
"""

from .. import lazy_face

FACE = {
    "runner": ("TinyGPTSpec", "PretrainRun", "RankResult", "build_tiny_config", "run_pretrain", "free_port",
               "join_ranks", "PRELOAD"),
    "layer_specs": ("layer_spec",),
    "qwen3": ("Qwen3ModelProvider", "qwen3_provider", "qwen3_defaults"),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
