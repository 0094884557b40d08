"""A tiny transformer layer laid out the way Megatron shards it, for the distributed tests.

Full matrices (every atomic module, ``d_out x d_in``): 8 Q heads, 4 K and 4 V groups of
``4 x 32``; proj ``32 x 32``; gate and up ``48 x 32``; down ``32 x 48``; optionally ``E`` MoE
experts with gate/up ``8 x 32`` and down ``32 x 8``. Each has a top singular value 1.25x the
second (as trained weights do; a Gaussian's top pair is nearly degenerate, which would make
``Theta`` ill-conditioned and the comparison meaningless) and is scaled to its radius.

Per TP rank (Megatron's layout): a fused QKV parameter holding this rank's KV groups, each
``[q heads of the group; k; v]`` (heads are local modules: row-slice views); fc1 ``[gate
shard; up shard]`` (rows split, ``partition_dim=0``); proj and fc2 with columns split
(``partition_dim=1``). Experts per EP rank: fc1 as a 3-D ``(E_local, 2*8, 32)`` tensor
(index ``(e, rows)``) and fc2 in the legacy grouped-GEMM orientation, a ``(E_local*8, 32)``
tensor holding each expert's down matrix transposed (``transpose=True``).
"""

from __future__ import annotations

import torch

from megatron_sso.distributed.atomic import AtomicModule
from megatron_sso.ops import target_radius

HIDDEN, HEADS, KV, HD, FFN, EFFN = 32, 8, 4, 4, 48, 8


def _gapped(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if S.numel() > 1:
        S[0] = 1.25 * S[1]
    W = (U * S) @ Vh
    return (W * (target_radius(m, n) / S[0])).float()


def full_shapes(experts: int = 0) -> dict[str, tuple[int, int]]:
    shapes = {f"q{h}": (HD, HIDDEN) for h in range(HEADS)}
    shapes.update({f"k{g}": (HD, HIDDEN) for g in range(KV)})
    shapes.update({f"v{g}": (HD, HIDDEN) for g in range(KV)})
    shapes.update(proj=(HIDDEN, HEADS * HD), gate=(FFN, HIDDEN), up=(FFN, HIDDEN), down=(HIDDEN, FFN))
    for e in range(experts):
        shapes.update({f"e{e}.gate": (EFFN, HIDDEN), f"e{e}.up": (EFFN, HIDDEN), f"e{e}.down": (HIDDEN, EFFN)})
    return shapes


def full_weights(seed: int = 0, experts: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: _gapped(m, n, gen) for k, (m, n) in full_shapes(experts).items()}


def full_grads(step: int, seed: int = 100, experts: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + step)
    return {k: torch.randn(m, n, generator=gen) for k, (m, n) in full_shapes(experts).items()}


class ShardedLayer:
    """One (TP rank, EP rank)'s parameters and atomic modules, filled from full matrices."""

    def __init__(self, full: dict[str, torch.Tensor], tp: int = 1, tp_rank: int = 0, experts: int = 0,
                 ep: int = 1, ep_rank: int = 0, mark_split_at_tp1: bool = True) -> None:
        self.tp, self.tp_rank, self.ep, self.ep_rank = tp, tp_rank, ep, ep_rank
        kv_local = KV // tp
        q_per = HEADS // KV
        rows = kv_local * (q_per + 2) * HD
        self.qkv = torch.nn.Parameter(torch.zeros(rows, HIDDEN))
        self.fc1 = torch.nn.Parameter(torch.zeros(2 * FFN // tp, HIDDEN))
        self.proj = torch.nn.Parameter(torch.zeros(HIDDEN, HEADS * HD // tp))
        self.fc2 = torch.nn.Parameter(torch.zeros(HIDDEN, FFN // tp))
        self.modules: list[AtomicModule] = []
        self.names: list[str] = []
        self.where: list[tuple[slice, slice]] = []  # this module's part of the full matrix
        r = 0
        for g in range(tp_rank * kv_local, (tp_rank + 1) * kv_local):
            for name in [f"q{g * q_per + j}" for j in range(q_per)] + [f"k{g}", f"v{g}"]:
                self._add(name, self.qkv, (slice(r, r + HD),), (HD, HIDDEN), None, 0, False)
                r += HD
        sharded = tp > 1 or mark_split_at_tp1
        f = FFN // tp
        self._add("gate", self.fc1, (slice(0, f),), (FFN, HIDDEN), 0 if sharded else None, tp_rank * f, False)
        self._add("up", self.fc1, (slice(f, 2 * f),), (FFN, HIDDEN), 0 if sharded else None, tp_rank * f, False)
        c = HEADS * HD // tp
        self._add("proj", self.proj, (slice(None),), (HIDDEN, HEADS * HD), 1 if sharded else None, tp_rank * c, False)
        self._add("down", self.fc2, (slice(None),), (HIDDEN, FFN), 1 if sharded else None, tp_rank * f, False)
        self.params = [self.qkv, self.fc1, self.proj, self.fc2]
        if experts:
            e_local = experts // ep
            self.efc1 = torch.nn.Parameter(torch.zeros(e_local, 2 * EFFN, HIDDEN))
            self.efc2 = torch.nn.Parameter(torch.zeros(e_local * EFFN, HIDDEN))
            for j in range(e_local):
                e = ep_rank * e_local + j
                self._add(f"e{e}.gate", self.efc1, (j, slice(0, EFFN)), (EFFN, HIDDEN), None, 0, True)
                self._add(f"e{e}.up", self.efc1, (j, slice(EFFN, 2 * EFFN)), (EFFN, HIDDEN), None, 0, True)
                self._add(f"e{e}.down", self.efc2, (slice(j * EFFN, (j + 1) * EFFN),), (HIDDEN, EFFN), None, 0,
                          True, transpose=True)
            self.params += [self.efc1, self.efc2]
        self.load(full)

    def _add(self, name, param, index, full_shape, pdim, offset, expert, transpose=False) -> None:
        mod = AtomicModule(param, index, full_shape, pdim, offset, transpose, expert, name)
        self.modules.append(mod)
        self.names.append(name)
        m, n = mod.shape
        if pdim is None:
            self.where.append((slice(0, m), slice(0, n)))
        elif pdim == 0:
            self.where.append((slice(offset, offset + m), slice(0, n)))
        else:
            self.where.append((slice(0, m), slice(offset, offset + n)))

    def load(self, full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for mod, name, (rs, cs) in zip(self.modules, self.names, self.where):
                mod.weight().copy_(full[name][rs, cs])

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        for p in self.params:
            p.grad = torch.zeros_like(p)
        for mod, name, (rs, cs) in zip(self.modules, self.names, self.where):
            mod.grad().copy_(grads[name][rs, cs])

    def max_diff(self, ref: dict[str, torch.Tensor]) -> float:
        """Max abs difference of this rank's modules to the reference, in units of each
        module's radius (the matrices are normalised to spectral norm 1)."""
        out = 0.0
        for mod, name, (rs, cs) in zip(self.modules, self.names, self.where):
            R = target_radius(*mod.full_shape)
            out = max(out, (mod.weight() - ref[name][rs, cs]).abs().max().item() / R)
        return out


def reference_run(steps: int, lr: float, experts: int = 0, nan: tuple = (), **config) -> list[dict[str, torch.Tensor]]:
    """Single-process trajectory with :class:`SpectralSphere` on the full matrices: the
    weights after each step. ``nan``: ``(step, name)`` whose gradient is made non-finite."""
    from megatron_sso import SpectralSphere

    full = full_weights(experts=experts)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in full.items()}
    opt = SpectralSphere(list(params.values()), lr=lr, **config)
    out = []
    for step in range(steps):
        grads = full_grads(step, experts=experts)
        for k, p in params.items():
            p.grad = grads[k].clone()
            if (step, k) in nan:
                p.grad[0, 0] = float("nan")
        opt.step()
        out.append({k: p.detach().clone() for k, p in params.items()})
    return out
