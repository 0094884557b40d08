"""One builder for "our optimizer on the matrices, Megatron's Adam on the rest", chained.

SSO / MuonSphere / Muon (:mod:`.factory`) and SPECTRA (:mod:`.spectra_factory`) build their
Megatron optimizer the same way; only the torch optimizer that holds the matrices, its state
initialiser and (for SPECTRA's pre-clip) the wrapper classes differ. The steps:

1. route every trainable parameter (:func:`route`): 2-D hidden weights get their atomic-module
   layout (:mod:`.layouts`) in the :data:`LAYOUT_ATTR` attribute; embeddings, output layer,
   1-D parameters and (unless told otherwise) the MoE router are left to Adam;
2. group the matrices with Megatron's own ``_get_param_groups`` (lr_mult, wd_mult, min/max lr,
   decoupled lr...) -- the other parameters are hidden from it by ``requires_grad=False``;
3. wrap each torch optimizer as Megatron wraps Adam: ``FP32Optimizer``, or
   ``Float16OptimizerWithFloat16Params`` with fp32 main params (which get the layout too) and
   the grad scaler under bf16; dense and expert-parallel groups are separate members, with
   Megatron's grad-stats groups (``mp`` and ``tp_ep_pp``);
4. build Megatron's Adam for the rest with the *pristine* stock factory (the matrices hidden),
   on the same config object, and chain everything in one ``ChainedOptimizer`` -- so the
   global grad-norm clipping and the NaN/Inf skip span all members, ranks and stages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .layouts import ParamLayout, param_layout
from .sphere_optimizer import LAYOUT_ATTR
from .unsupported import refuse_cutting_settings

EMBEDDING_NAMES = ("word_embeddings.weight", "position_embeddings.weight", "output_layer.weight")
"""Parameter-name suffixes that always go to Adam (embeddings and the output layer)."""


def route(name: str, param: Any, router_on_sphere: bool) -> str:
    """``"sphere"`` (our optimizer) or ``"adam"`` for one trainable parameter (the routing table).

    A 2-D parameter with a dimension of 1 is a vector stored as a matrix, a gate like the
    router: megatron-core 0.16.1's ``SharedExpertMLP.gate_weight`` (``moe_shared_expert_gate``,
    shape ``(1, hidden)``, ``transformer/moe/shared_experts.py``) scales the shared expert's
    output by ``sigmoid(x . w)``. It goes to Adam whatever ``router_on_sphere`` says: its
    spectral norm is its Euclidean norm, so the sphere would only fix its length, its packed
    cache needs 3 rows (the build failed with "has 1 local rows"), and Muon's msign would reduce
    its update to ``g / ||g||``.
    """
    if param.dim() != 2 or min(param.shape) == 1:
        return "adam"
    if name.endswith(EMBEDDING_NAMES) or getattr(param, "is_embedding_or_output_parameter", False):
        return "adam"
    if ".router." in f".{name}" and not router_on_sphere:
        return "adam"
    return "sphere"


def is_expert(name: str) -> bool:
    """A routed expert's weight (expert-parallel groups); shared experts are dense."""
    return "experts" in name and "shared_experts" not in name


def group_size(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None else 1


@functools.lru_cache(maxsize=None)
def pristine_factory():
    """megatron-core's own ``get_megatron_optimizer``, as imported before any wrapping."""
    import megatron.core.optimizer as mco

    return mco.get_megatron_optimizer


def assign_layouts(model_chunks: list, tp_groups: dict, router_on_sphere: bool, split_qkv: bool,
                   split_glu: bool, check_layout: Optional[Callable[[ParamLayout], None]] = None
                   ) -> tuple[list, list]:
    """Route every trainable parameter; give each matrix its layout (``LAYOUT_ATTR``).

    Returns ``(matrices, others)``; ``tp_groups`` is ``{"dense": group, "expert": group}``.
    """
    matrices, others = [], []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            if route(name, p, router_on_sphere) == "adam":
                others.append(p)
                continue
            tp = group_size(tp_groups["expert" if is_expert(name) else "dense"])
            layout = param_layout(name, p, chunk.config, tp, split_qkv=split_qkv, split_glu=split_glu)
            if check_layout is not None:
                check_layout(layout)
            setattr(p, LAYOUT_ATTR, layout)
            matrices.append(p)
    return matrices, others


@dataclass
class MatrixChain:
    """What :func:`build_chain` returns: the chained optimizer and what went where."""

    optimizer: Any
    matrices: list
    others: list

    @property
    def modules(self) -> int:
        return sum(len(getattr(p, LAYOUT_ATTR).modules) for p in self.matrices)


def build_chain(config: Any, model_chunks: list, *, router_on_sphere: bool, split_qkv: bool,
                split_glu: bool, make_inner: Callable[[list, dict, Any], Any], init_state_fn: Callable,
                wrapper_classes: Optional[tuple[type, type]] = None,
                check_layout: Optional[Callable[[ParamLayout], None]] = None,
                before_grouping: Optional[Callable[[list, dict], None]] = None,
                config_overrides: Optional[dict] = None, use_gloo_process_groups: bool = True,
                pg_collection: Any = None) -> MatrixChain:
    """Build the chain (module docstring).

    Args:
        make_inner: ``(param_groups, tp_groups, pg_collection) -> torch optimizer`` for one member.
        init_state_fn: Megatron's ``init_state_fn`` for that optimizer (state before a load).
        wrapper_classes: ``(fp32_cls, float16_cls)``; default Megatron's ``FP32Optimizer`` and
            ``Float16OptimizerWithFloat16Params``.
        check_layout: called on every matrix's layout (e.g. the SSO cache-size check).
        before_grouping: ``(matrices, tp_groups)``, e.g. spectral-muP initialisation.
        pg_collection: as given to Megatron's factory; ``None`` uses the mpu groups (and is
            passed on as ``None``: Megatron refuses gloo groups together with a collection).
    """
    refuse_cutting_settings(config, model_chunks)  # before anything is built
    from megatron.core.optimizer import (ChainedOptimizer, Float16OptimizerWithFloat16Params,
                                         FP32Optimizer, _get_param_groups, get_standard_config_overrides)
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.process_groups_config import ProcessGroupCollection

    fp32_cls, fp16_cls = wrapper_classes or (FP32Optimizer, Float16OptimizerWithFloat16Params)
    given_pgs = pg_collection
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp_groups = {"dense": pg_collection.tp, "expert": getattr(pg_collection, "expt_tp", None)}

    matrices, others = assign_layouts(model_chunks, tp_groups, router_on_sphere, split_qkv, split_glu,
                                      check_layout)
    if before_grouping is not None:
        before_grouping(matrices, tp_groups)

    with _hidden(others):  # Megatron's own grouping of the matrices only
        # None means Megatron's standard overrides (no decay on biases and 1-D, decoupled lr): applied
        # inside _get_param_groups by megatron-core 0.16, by get_megatron_optimizer from 0.18 on
        standard = get_standard_config_overrides(config) if config_overrides is None else config_overrides
        groups = _get_param_groups(model_chunks, config, standard)

    def wrap(param_groups, stats_group):
        inner = make_inner(param_groups, tp_groups, pg_collection)
        if config.bf16:
            scaler = ConstantGradScaler(config.loss_scale) if config.loss_scale else None
            opt = fp16_cls(inner, config, scaler, init_state_fn)
            for group in opt.float16_groups:  # fp32 main params carry the layout too
                for model_param in group:
                    setattr(model_param.main_param, LAYOUT_ATTR, getattr(model_param, LAYOUT_ATTR))
        else:
            opt = fp32_cls(inner, config, init_state_fn)
        opt.grad_stats_parallel_group = stats_group
        opt.tp_group = pg_collection.tp
        return opt

    members = [wrap([g for g in groups if not g["is_expert_parallel"]], pg_collection.mp)]
    expert_groups = [g for g in groups if g["is_expert_parallel"]]
    if expert_groups:
        members.append(wrap(expert_groups, pg_collection.tp_ep_pp))

    mode = config.optimizer
    config.optimizer = "adam"
    try:
        with _hidden(matrices):  # everything else: Megatron's own Adam, same config object
            adam = pristine_factory()(config, model_chunks, config_overrides=config_overrides,
                                      use_gloo_process_groups=use_gloo_process_groups,
                                      pg_collection=given_pgs)
    finally:
        config.optimizer = mode
    return MatrixChain(ChainedOptimizer(members + list(adam.chained_optimizers)), matrices, others)


class _hidden:
    """Context: ``requires_grad=False`` on ``params`` (so Megatron's grouping skips them)."""

    def __init__(self, params: list) -> None:
        self.params = params

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(True)
