"""Atomic modules of Megatron-Core parameters, as views into the parameter tensor.

SSO keeps every *atomic module* on its own spectral sphere (paper §4.3): each Q head, K group
and V group of a fused QKV weight, the gate and up halves of a SwiGLU fc1, each MoE expert.
Megatron fuses them into one parameter, so this module says, for a parameter name and the
model's ``TransformerConfig``, which ``(d_out, d_in)`` matrices live where in the tensor.

Every module is returned as a *view* of the tensor it is asked about (``view.data_ptr()`` lies
inside the parameter's storage): a reshape of a strided slice would copy, and a retraction
written into a copy never reaches the weight (SPEC pitfall 1). Layouts, verified against
megatron-core 0.16.1 (TEGroupedMLP against 0.19.2's source):

* ``linear_qkv.weight`` (``transformer/attention.py``, ``SelfAttention.get_query_key_value_tensors``):
  rows are ``ng_local`` query groups, each ``[q heads of the group (np/ng), (gate heads if
  attention_output_gate), k, v]`` of ``kv_channels`` rows. A head is whole on its TP rank
  (the column-parallel split falls between groups), so it is updated locally (pitfall 4).
* gated ``linear_fc1.weight`` (``transformer/mlp.py``, ``glu``: ``torch.chunk(x, 2, dim=-1)``):
  first half of the local rows is the gate, second the up projection; sizes come from the
  tensor's own shape (experts, shared experts and TP shards differ, pitfall 3).
* ``experts.linear_fc1.weight<i>`` / ``linear_fc2.weight<i>`` of ``TEGroupedMLP`` (megatron-core
  0.17+, ``transformer/moe/experts.py``; Transformer Engine's ``GroupedLinear`` holds one
  ``(out, in)`` weight per local expert ``i``, used as ``x W_i^T``): each is a dense fc1 / fc2
  of its own, so the two bullets above and below apply per expert (gate/up halves of the
  local rows; fc2 whole, column-split over expert TP, ``partition_dim`` 1). 0.19's
  ``moe_mlp_glu_interleave_size`` alternates gate and up blocks instead: refused.
* ``experts.weight1`` / ``weight2`` of ``GroupedMLP`` (``transformer/moe/experts.py``,
  ``forward``: ``weight1.view(E, hidden, -1)``, ``weight2.view(E, -1, hidden)``, used as
  ``x @ w``): expert-major memory, each expert's matrix transposed (pitfall 2).
* ``linear_proj`` and ``linear_fc2`` (row-parallel) and everything else: the whole tensor.

``tp_dim`` says along which dimension of the *atomic matrix* the TP ranks split it (``None``:
whole on this rank).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class AtomicModule:
    """One matrix of a parameter: ``view(t)`` returns its ``(m_local, n_local)`` view of a
    tensor shaped like the parameter (the weight, its gradient or a state tensor)."""

    name: str
    kind: str
    view: Callable[[Tensor], Tensor]
    local_shape: tuple[int, int]
    full_shape: tuple[int, int]
    tp_dim: Optional[int]


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter splits into atomic modules and which TP group shards them."""

    name: str
    modules: tuple[AtomicModule, ...]
    expert: bool
    tp_size: int


def _rows(start: int, stop: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t[start:stop]


def _qkv_rows(ng: int, per_group: int, start: int, stop: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t.view(ng, per_group, t.size(-1))[:, start:stop]


def _qkv_head(ng: int, per_group: int, g: int, start: int, stop: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t.view(ng, per_group, t.size(-1))[g, start:stop]


def _grouped(num_experts: int, e: int, first: bool, cols: Optional[tuple[int, int]], hidden: int):
    def view(t: Tensor) -> Tensor:
        w = t.view(num_experts, hidden, -1)[e] if first else t.view(num_experts, -1, hidden)[e]
        if cols is not None:
            w = w[:, cols[0]:cols[1]]
        return w.t()  # the forward computes x @ w: the (d_out, d_in) matrix is w^T

    return view


def _full(local: tuple[int, int], tp_dim: Optional[int], tp: int) -> tuple[int, int]:
    if tp_dim is None:
        return local
    full = list(local)
    full[tp_dim] *= tp
    return tuple(full)


def _module(name, kind, view, local, tp_dim, tp) -> AtomicModule:
    return AtomicModule(name, kind, view, local, _full(local, tp_dim, tp), tp_dim if tp > 1 else None)


def _qkv_modules(name: str, shape, cfg: Any, tp: int, split: bool) -> list[AtomicModule]:
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hn = cfg.kv_channels
    if groups < tp or groups % tp or heads % groups:
        raise ValueError(
            f"{name}: num_query_groups={groups} must be a multiple of tensor_model_parallel_size={tp} "
            f"and divide num_attention_heads={heads} for per-head atomic modules"
        )
    ng, qpg = groups // tp, heads // groups
    gate = bool(getattr(cfg, "attention_output_gate", False))
    per_group = (2 * qpg + 2 if gate else qpg + 2) * hn
    if shape[0] != ng * per_group:
        raise ValueError(f"{name}: {shape[0]} rows do not match {ng} local query groups x {per_group} rows "
                         f"(heads={heads}, groups={groups}, kv_channels={hn}, tp={tp})")
    n = shape[1]
    if not split:
        return [_module(name, "qkv", lambda t: t, tuple(shape), 0, tp)]
    kinds = ["q"] * qpg + (["gate"] * qpg if gate else []) + ["k", "v"]
    out = []
    for g in range(ng):
        for j, kind in enumerate(kinds):
            out.append(AtomicModule(f"{name}[group {g} {kind}{j if kind in ('q', 'gate') else ''}]",
                                    f"qkv_{kind}", _qkv_head(ng, per_group, g, j * hn, (j + 1) * hn),
                                    (hn, n), (hn, n), None))
    return out


_FC1 = re.compile(r"linear_fc1\.weight\d*$")  # dense, shared, SequentialMLP and TE grouped experts


def param_layout(name: str, param: Tensor, cfg: Any, tp_size: int, *, split_qkv: bool = True,
                 split_glu: bool = True) -> ParamLayout:
    """Atomic modules of the 2-D parameter ``name`` (as ``named_parameters`` spells it).

    ``cfg`` is the model's ``TransformerConfig``; ``tp_size`` the size of the TP group that
    shards this parameter (the expert TP group for routed experts). Raises ValueError for a
    layout the configuration cannot explain (e.g. more TP ranks than query groups).
    """
    if param.dim() != 2:
        raise ValueError(f"{name}: atomic modules come from 2-D weights, got shape {tuple(param.shape)}")
    shape = tuple(param.shape)
    expert = "experts" in name and "shared_experts" not in name
    glu = bool(getattr(cfg, "gated_linear_unit", False))
    tp = tp_size
    mods: list[AtomicModule]
    if name.endswith("linear_qkv.weight"):
        mods = _qkv_modules(name, shape, cfg, tp, split_qkv)
    elif name.endswith("experts.weight1") or name.endswith("experts.weight2"):
        hidden = cfg.hidden_size
        first = name.endswith("weight1")
        total = shape[1] if first else shape[0]
        num = _local_experts_hint(cfg, total, first, glu, tp)
        width = total // num  # per-expert columns of weight1 / rows of weight2 (local)
        mods = []
        for e in range(num):
            if first and glu and split_glu:
                half = width // 2
                mods.append(_module(f"{name}[expert {e} gate]", "expert_gate",
                                    _grouped(num, e, True, (0, half), hidden), (half, hidden), 0, tp))
                mods.append(_module(f"{name}[expert {e} up]", "expert_up",
                                    _grouped(num, e, True, (half, width), hidden), (width - half, hidden), 0, tp))
            elif first:
                mods.append(_module(f"{name}[expert {e}]", "expert_fc1", _grouped(num, e, True, None, hidden),
                                    (width, hidden), 0, tp))
            else:
                mods.append(_module(f"{name}[expert {e}]", "expert_fc2", _grouped(num, e, False, None, hidden),
                                    (hidden, width), 1, tp))
    elif _FC1.search(name) and glu and split_glu:
        interleave = _glu_interleave(name, cfg, expert)
        if interleave is not None:  # alternate blocks of gate and up rows: no 2-D view holds a half
            raise ValueError(f"{name}: {interleave[0]}={interleave[1]} interleaves the gate and up rows of "
                             "this fc1, so its halves are not views; leave it unset, or pass "
                             "sso_split_glu=False (one module per fc1)")
        if shape[0] % 2:
            raise ValueError(f"{name}: a gated fc1 needs an even number of rows, got {shape[0]}")
        half = shape[0] // 2  # from this tensor's own shape (pitfall 3)
        mods = [_module(f"{name}[gate]", "gate", _rows(0, half), (half, shape[1]), 0, tp),
                _module(f"{name}[up]", "up", _rows(half, shape[0]), (half, shape[1]), 0, tp)]
    else:
        tp_dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
        tp_dim = None if tp_dim not in (0, 1) else tp_dim
        kind = name.rsplit(".", 2)[-2] if "." in name else name
        mods = [_module(name, kind, lambda t: t, shape, tp_dim, tp if tp_dim is not None else 1)]
    if "shared_experts" in name or (expert and not mods[0].kind.startswith("expert")):
        prefix = "shared_" if "shared_experts" in name else "expert_"
        mods = [dataclasses.replace(m, kind=prefix + m.kind) for m in mods]
    return ParamLayout(name, tuple(mods), expert, tp)


def _glu_interleave(name: str, cfg: Any, expert: bool) -> Optional[tuple[str, int]]:
    """``(setting, block)`` when megatron-core (0.19) stores this gated fc1 as alternating
    ``block``-row runs of gate and up (``TEGroupedMLP._remove_glu_interleaving``; the fused
    shared expert's ``ScaledSwiGLU(glu_interleave_size=...)``), None for the ``[gate; up]`` halves."""
    if expert:
        setting = "moe_mlp_glu_interleave_size"
    elif "shared_experts" in name and getattr(cfg, "use_grouped_gemm_for_shared_expert", False):
        setting = "moe_shared_expert_glu_interleave_size"
    else:
        return None
    block = getattr(cfg, setting, None)
    return None if block is None else (setting, block)


def _local_experts_hint(cfg: Any, total: int, first: bool, glu: bool, tp: int) -> int:
    """Local expert count of a GroupedMLP weight from its own width: ``moe_ffn_hidden_size``
    (x2 for GLU on weight1) divided by the expert TP size is the per-expert width."""
    ffn = getattr(cfg, "moe_ffn_hidden_size", None) or cfg.ffn_hidden_size
    per_expert = ffn * (2 if first and glu else 1)
    if per_expert % tp or total % (per_expert // tp):
        raise ValueError(f"GroupedMLP width {total} is not a multiple of the per-expert width "
                         f"{per_expert}/{tp} (moe_ffn_hidden_size={ffn}, expert TP={tp})")
    return total // (per_expert // tp)
