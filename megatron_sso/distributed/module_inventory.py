"""The atomic modules of the paper's recipes, as shapes, for data-parallel planning.

Shapes are ``(d_out, d_in)`` in ``torch.nn.Linear`` orientation; sizes from SPEC §6 (paper §6):

* ``dense-1.7b``: 28 layers, hidden 2048, 16 heads, 8 KV groups, head dim 128, FFN 6144;
* ``moe-8b-a1b``: 27 layers, same attention; layer 0 dense with FFN 4096, layers 1-26 MoE with
  64 experts of FFN 768 and one shared expert of FFN 768 (EP 8 in the paper);
* ``deepnet-200``: 200 layers, hidden 512, 8 heads, 4 KV groups, head dim 128, FFN 1536 (PP 8).

Atomic modules per layer (SPEC §3): each Q head ``head_dim x hidden``, each K and V group
``head_dim x hidden``, proj ``hidden x heads*head_dim`` whole, gate and up ``ffn x hidden``,
fc2/down ``hidden x ffn``. Routers, norms and embeddings belong to AdamW and are not listed.
The shared expert is a dense (TP-sharded) MLP in Megatron, so it plans with the dense modules.

Tensor parallelism (``tp``): heads are dealt whole to TP ranks (local, SPEC pitfall 4); gate,
up and the experts' fc1 are column-parallel (rows split); proj and fc2 row-parallel (columns
split). Expert matrices use the expert-tensor-parallel size ``etp`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .dp_plan import DEFAULT_TOLERANCE, DPPlan, PlanItem, plan_dp

RECIPES = ("dense-1.7b", "moe-8b-a1b", "deepnet-200")


@dataclass(frozen=True)
class ModuleShape:
    """One atomic module of a recipe: ``shape = (d_out, d_in)``; ``tp_dim`` is the dimension
    Megatron's TP splits (``None``: dealt whole to one TP rank, like a head). Heads and experts
    carry their ``index`` among ``family`` siblings (the heads of one kind in a layer, the
    experts of a layer), by which TP and EP deal them to ranks."""

    name: str
    shape: tuple[int, int]
    tp_dim: Optional[int]
    expert: bool = False
    index: int = 0
    family: int = 1


@dataclass(frozen=True)
class _Arch:
    layers: int
    hidden: int
    heads: int
    kv_groups: int
    head_dim: int
    ffn: int
    moe_layers: int = 0
    experts: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0


_ARCHS = {
    "dense-1.7b": _Arch(28, 2048, 16, 8, 128, 6144),
    "moe-8b-a1b": _Arch(27, 2048, 16, 8, 128, 4096, moe_layers=26, experts=64, expert_ffn=768, shared_ffn=768),
    "deepnet-200": _Arch(200, 512, 8, 4, 128, 1536),
}


def _mlp(prefix: str, ffn: int, hidden: int, expert: bool = False, index: int = 0,
         family: int = 1) -> list[ModuleShape]:
    return [ModuleShape(f"{prefix}.gate", (ffn, hidden), 0, expert, index, family),
            ModuleShape(f"{prefix}.up", (ffn, hidden), 0, expert, index, family),
            ModuleShape(f"{prefix}.down", (hidden, ffn), 1, expert, index, family)]


def recipe_modules(name: str, pp: int = 1, stage: int = 0) -> list[ModuleShape]:
    """Atomic modules of pipeline stage ``stage`` of ``pp`` (layers split evenly, the first
    stages taking one more when it does not divide)."""
    if name not in _ARCHS:
        raise ValueError(f"unknown recipe {name!r}; choose one of {RECIPES}")
    a = _ARCHS[name]
    if isinstance(pp, bool) or not isinstance(pp, int) or not 1 <= pp <= a.layers:
        raise ValueError(f"pipeline size must be an integer in [1, {a.layers}], got {pp!r}")
    if not 0 <= stage < pp:
        raise ValueError(f"pipeline stage {stage!r} outside [0, {pp})")
    base, extra = divmod(a.layers, pp)
    first = stage * base + min(stage, extra)
    layers = range(first, first + base + (1 if stage < extra else 0))
    out: list[ModuleShape] = []
    for layer in layers:
        p = f"layers.{layer}"
        hd = (a.head_dim, a.hidden)
        out += [ModuleShape(f"{p}.q{h}", hd, None, False, h, a.heads) for h in range(a.heads)]
        out += [ModuleShape(f"{p}.k{h}", hd, None, False, h, a.kv_groups) for h in range(a.kv_groups)]
        out += [ModuleShape(f"{p}.v{h}", hd, None, False, h, a.kv_groups) for h in range(a.kv_groups)]
        out.append(ModuleShape(f"{p}.proj", (a.hidden, a.heads * a.head_dim), 1))
        moe = a.moe_layers and layer >= a.layers - a.moe_layers
        if not moe:
            out += _mlp(f"{p}.mlp", a.ffn, a.hidden)
            continue
        out += _mlp(f"{p}.shared", a.shared_ffn, a.hidden)
        for e in range(a.experts):
            out += _mlp(f"{p}.expert{e}", a.expert_ffn, a.hidden, True, e, a.experts)
    return out


def local_modules(modules: list[ModuleShape], tp: int = 1, etp: int = 1, ep: int = 1,
                  tp_rank: int = 0, ep_rank: int = 0) -> list[ModuleShape]:
    """The modules one (TP rank, EP rank) holds: heads dealt in contiguous blocks, split
    dimensions divided by ``tp`` (``etp`` for experts), experts dealt in blocks of ``1/ep``.
    Returned shapes are the local shard's; ``tp_dim`` stays set when the size is > 1."""
    for label, value in (("tp", tp), ("etp", etp), ("ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    out = []
    for m in modules:
        dealer, rank = (ep, ep_rank) if m.expert else (tp, tp_rank)
        if m.expert or m.tp_dim is None:  # dealt whole, in contiguous blocks
            if m.family % dealer:
                raise ValueError(f"{m.family} siblings of {m.name} do not divide across {dealer} ranks")
            if m.index // (m.family // dealer) != rank:
                continue
            if not m.expert:
                out.append(m)
                continue
        parts = etp if m.expert else tp
        shape = list(m.shape)
        if parts > 1:
            if shape[m.tp_dim] % parts:
                raise ValueError(f"{m.name}: dim {m.tp_dim} of {tuple(shape)} does not divide across {parts}")
            shape[m.tp_dim] //= parts
        out.append(ModuleShape(m.name, (shape[0], shape[1]), m.tp_dim if parts > 1 else None,
                               m.expert, m.index, m.family))
    return out


def split_dim_of(shape: tuple[int, int], tp_dim: Optional[int]) -> int:
    """The dimension along which a module is cut for data-parallel splitting: its TP
    dimension if it has one (the shards already split it), else its longer side (rows on a
    tie), so that the split Newton-Schulz keeps the small Gram (SPEC §4)."""
    if tp_dim is not None:
        return tp_dim
    return 0 if shape[0] >= shape[1] else 1


def plan_item(shape: tuple[int, int], tp_dim: Optional[int], calls: float = 2.0, steps: int = 8) -> PlanItem:
    """The planner's view of a local (or local shard's) ``shape``, see :func:`split_dim_of`."""
    d = split_dim_of(shape, tp_dim)
    return PlanItem(shape[d], shape[1 - d], calls, True, steps)


def recipe_plans(name: str, dp: int, *, tp: int = 1, ep: Optional[int] = None, etp: int = 1, pp: int = 1,
                 stage: int = 0, calls: float = 2.0, steps: int = 8, model: str = "numel",
                 split: str = "auto", tolerance: float = DEFAULT_TOLERANCE,
                 refine: bool = True) -> dict[str, DPPlan]:
    """The data-parallel plans of one (TP rank 0, EP rank 0, pipeline ``stage``) of a recipe.

    ``dp`` is the dense data-parallel size; expert modules plan over the expert-data-parallel
    size ``dp * tp / (ep * etp)`` (Megatron: both fill the same ranks of a pipeline stage).
    ``ep`` defaults to the recipe's (8 for MoE 8B-A1B, SPEC §6; 1 otherwise).
    Returns ``{"dense": plan}`` plus ``"expert"`` for MoE recipes.
    """
    if ep is None:
        ep = 8 if name == "moe-8b-a1b" else 1
    mods = local_modules(recipe_modules(name, pp, stage), tp=tp, etp=etp, ep=ep)
    out = {}
    for domain, members, world in (("dense", [m for m in mods if not m.expert], dp),
                                   ("expert", [m for m in mods if m.expert], None)):
        if not members:
            continue
        if world is None:
            if (dp * tp) % (ep * etp):
                raise ValueError(f"dp*tp = {dp * tp} does not divide by ep*etp = {ep * etp}")
            world = dp * tp // (ep * etp)
        items = [plan_item(m.shape, m.tp_dim, calls, steps) for m in members]
        out[domain] = plan_dp(items, world, model=model, split=split, tolerance=tolerance, refine=refine)
    return out
