"""Megatron settings that would cut an atomic module, refused with one line before anything is built.

Our optimizers update every atomic module (a Q head, a K/V group, a gate or up half, one expert's
matrix) whole, from the full gradient of that module (SPEC §3). A Megatron feature that hands the
optimizer a piece of a module, gives a rank only part of the gradients, or lays modules out in a
way :mod:`.layouts` does not describe would make the update silently wrong, so it is refused.
The table holds what megatron-core 0.17-0.19 added (read from the 0.19.2 sources; older releases
lack the attributes, which then read as off) plus Megatron FSDP, older but never supported.
The distributed optimizer, fp16 and CPU offload keep their own messages in the factories;
block-interleaved gate/up rows (``moe_mlp_glu_interleave_size``, 0.19) are refused by
:func:`.layouts.param_layout`, which knows which parameter they would cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Refusal:
    """One refused setting."""

    section: str
    """Where it lives: ``"optimizer"`` (OptimizerConfig), ``"model"`` (TransformerConfig, the
    model chunks' ``config``) or ``"ddp"`` (DistributedDataParallelConfig, ``ddp_config``)."""
    name: str
    """The attribute (and recipe key) name."""
    is_on: Callable[[Any], bool]
    """Whether a value turns the feature on (values of releases without it never do)."""
    why: str
    """What it would break and what to set instead (the second half of the one-line error)."""


def _true(value: Any) -> bool:
    return bool(value)


def _above_one(value: Any) -> bool:
    return value is not None and value > 1


REFUSALS: tuple[Refusal, ...] = (
    Refusal("optimizer", "use_layer_wise_distributed_optimizer", _true,
            "Megatron's layer-wise optimizer gives each data-parallel rank the gradients of its own "
            "parameters only (Megatron-LM >= 0.18 sets it from --use-distributed-optimizer for any "
            "optimizer but adam/sgd); drop --use-distributed-optimizer / set it false: our optimizers "
            "shard their work by whole atomic modules themselves (sso_dp_shard)"),
    Refusal("ddp", "use_megatron_fsdp", _true,
            "Megatron FSDP shards every parameter into flat pieces across data-parallel ranks; set it false"),
    Refusal("model", "moe_single_grouped_weight", _true,
            "all experts of a layer in one parameter (megatron-core 0.19) have no per-expert layout here; "
            "set it false (one linear_fc1.weight<i> / linear_fc2.weight<i> per expert)"),
    Refusal("model", "gtp_weight_remat_size", _above_one,
            "weight rematerialisation shards each weight beyond tensor parallelism "
            "(tensor_parallel_num_weight_shards > tensor_model_parallel_size, megatron-core 0.19); "
            "leave tensor_parallel_num_weight_shards unset"),
    Refusal("model", "expert_gtp_weight_remat_size", _above_one,
            "expert weight rematerialisation shards each expert weight beyond expert tensor parallelism "
            "(expert_tensor_parallel_num_weight_shards, megatron-core 0.19); leave it unset"),
)
"""Every refused setting, checked in this order (the first one on is reported)."""


def find_refusal(mode: str, sections: dict[str, Any]) -> Optional[str]:
    """The one-line reason ``optimizer=mode`` cannot run with these settings, or None.

    ``sections`` maps ``"optimizer"``, ``"model"``, ``"ddp"`` to the config objects (any may be
    missing or None; a missing attribute is off). Used by the factories on the real objects and
    by the CLI on a recipe's ``ConfigContainer`` before launch.
    """
    for refusal in REFUSALS:
        value = getattr(sections.get(refusal.section), refusal.name, None)
        if refusal.is_on(value):
            return f"optimizer={mode!r} with {refusal.section}.{refusal.name}={value!r}: {refusal.why}"
    return None


def refuse_cutting_settings(config: Any, model_chunks: list) -> None:
    """Raise ValueError (:func:`find_refusal`) for ``config`` (an OptimizerConfig) and the model
    chunks Megatron's factory received (their ``config`` and ``ddp_config``)."""
    mode = getattr(config, "optimizer", None)
    chunks = list(model_chunks) or [None]
    for chunk in chunks:
        sections = {"optimizer": config, "model": getattr(chunk, "config", None),
                    "ddp": getattr(chunk, "ddp_config", None)}
        reason = find_refusal(mode, sections)
        if reason is not None:
            raise ValueError(reason)
