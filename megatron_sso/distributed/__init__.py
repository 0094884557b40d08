"""Collectives for the sphere optimizers: tensor, data and expert parallelism (SPEC §4).

Imports ``torch``, ``torch.distributed`` and :mod:`megatron_sso.ops` only (never Megatron, never
:mod:`megatron_sso.optim`); the optimizer that uses it is
:class:`megatron_sso.optim.distributed_sphere.DistributedSpectralSphere`. See
``docs/distributed.md``.
"""

from .atomic import AtomicModule
from .comm import CommCounter, group_rank, group_size, ring_allgather_bytes, ring_allreduce_bytes
from .data_parallel import SubgroupCache, agree_flags, all_gather_pieces
from .dp_plan import DEFAULT_TOLERANCE, DPPlan, Piece, PlanItem, piece_cost, plan_dp, zigzag_deal
from .module_inventory import RECIPES, ModuleShape, local_modules, recipe_modules, recipe_plans
from .tensor_parallel import TP_MODES, TPMode, all_gather_shards, chain_allreduce, make_allreduce, own_slice

__all__ = [
    "AtomicModule",
    "CommCounter",
    "DEFAULT_TOLERANCE",
    "DPPlan",
    "ModuleShape",
    "Piece",
    "PlanItem",
    "RECIPES",
    "SubgroupCache",
    "TPMode",
    "TP_MODES",
    "agree_flags",
    "all_gather_pieces",
    "all_gather_shards",
    "chain_allreduce",
    "group_rank",
    "group_size",
    "local_modules",
    "make_allreduce",
    "own_slice",
    "piece_cost",
    "plan_dp",
    "recipe_modules",
    "recipe_plans",
    "ring_allgather_bytes",
    "ring_allreduce_bytes",
    "zigzag_deal",
]
