"""The optimizers' steps on the ``meta`` device, with no host synchronisation (issue 13 items 1, 6).

CPU CI has no GPU, and a CPU run cannot tell a host tensor from a device tensor: the Megatron
optimizer stacked ``torch.tensor(float(len(idx)))`` (host) with CUDA tensors and died at
iteration 1 on every GPU while every CPU test passed. On ``meta`` the same mix raises, every host
read raises, and :class:`tests.device_guard.HostSyncGuard` records what would make a GPU step
wait for the host: each step below must record nothing. Two steps each (cold and warm paths).

Collectives run through torch's ``fake`` process group (one process that believes it is rank
0 of 2; collectives return at once): the shapes, the devices and the host reads of the
tensor- and data-parallel code paths are exercised, not their values (the gloo tests do that).
"""

from __future__ import annotations

import pytest
import torch

from megatron_sso import SpectralSphere
from megatron_sso.optim import DistributedSpectralSphere
from megatron_sso.optim.spectra import Spectra
from tests.device_guard import HostSyncGuard
from tests.distributed import toy

META = torch.device("meta")
CHEAP = {"power_iters_cold": 2, "power_iters": 1}
"""Fewer iterations: what is checked is which ops run, and every iteration runs the same ones."""


def _meta_params(*shapes) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.empty(shape, device=META)) for shape in shapes]


BUILT_ONCE = ("optim/index_cache.py", "self._tp_index = ")
"""Index tensors the first step builds and caches (one host-to-device copy each, once per
run): allowed in step 1 only, so a per-step copy still fails in step 2."""


def _steps_clean(opt, params, steps: int = 2, grads=None) -> None:
    for step in range(steps):
        if grads is None:
            for p in params:
                p.grad = torch.empty_like(p)
        else:
            grads()
        with HostSyncGuard(META) as guard:
            opt.step()
        guard.check(allowed=BUILT_ONCE if step == 0 else ())


@pytest.mark.parametrize("mode,method", [("sso", "standard"), ("sso", "gram"), ("muon_sphere", "standard"),
                                         ("muon", "standard")])
def test_spectral_sphere(mode, method):
    params = _meta_params((16, 24), (16, 24), (24, 8))
    opt = SpectralSphere(params, lr=1e-2, mode=mode, msign_method=method, **CHEAP)
    _steps_clean(opt, params)
    assert opt._last_stats.max_abs_h.device == META  # statistics stay on the device


@pytest.mark.parametrize("base,clip", [("adamw", "soft"), ("adamw", "hard"), ("signum", "soft"),
                                       ("ademamix", "soft")])
def test_spectra(base, clip):
    params = _meta_params((16, 24), (24, 8), (24,))
    opt = Spectra(params, lr=1e-3, base=base, clip=clip, pre_clip=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        with HostSyncGuard(META) as guard:
            opt.pre_clip_gradients_()
            opt.step()
        # the hard clip min(sigma, c) needs the exact spectrum: one SVD per same-shape batch,
        # which synchronises on CUDA (README: what syncs); nothing else may
        guard.check(allowed=("ops/spectral_clip_hard.py",) if clip == "hard" else ())
        assert len(guard.events) == (2 if clip == "hard" else 0)


class _MetaLayer:
    """A :class:`toy.ShardedLayer`'s atomic modules over ``meta`` copies of its parameters."""

    def __init__(self, **kw) -> None:
        import dataclasses

        layer = toy.ShardedLayer(toy.full_weights(experts=kw.get("experts", 0)), **kw)
        meta = {id(p): torch.nn.Parameter(torch.empty_like(p, device=META)) for p in layer.params}
        self.params = list(meta.values())
        self.modules = [dataclasses.replace(m, param=meta[id(m.param)]) for m in layer.modules]


def _meta_layer(**kw) -> _MetaLayer:
    return _MetaLayer(**kw)


def test_distributed_sphere_one_process():
    layer = _meta_layer(experts=2, mark_split_at_tp1=False)
    opt = DistributedSpectralSphere(layer.modules, lr=1e-2, **CHEAP)
    _steps_clean(opt, layer.params, grads=lambda: _meta_grads(layer))


def _meta_grads(layer) -> None:
    for p in layer.params:
        p.grad = torch.empty_like(p, device=META)


@pytest.mark.parametrize("tp_mode", ["sharded", "duplicated"])
def test_distributed_sphere_tensor_parallel(fake_world, tp_mode):
    layer = _meta_layer(tp=2, tp_rank=0)
    opt = DistributedSpectralSphere(layer.modules, lr=1e-2, tp_group=fake_world, tp_mode=tp_mode,
                                    check_consistency=False, **CHEAP)
    _steps_clean(opt, layer.params, grads=lambda: _meta_grads(layer))


def test_distributed_sphere_data_parallel_split(fake_world):
    layer = _meta_layer(experts=2, mark_split_at_tp1=False)
    opt = DistributedSpectralSphere(layer.modules, lr=1e-2, dp_group=fake_world, expert_dp_group=fake_world,
                                    dp_split="auto", imbalance_tolerance=1.0, check_consistency=False,
                                    subgroup_factory=lambda ranks: fake_world, **CHEAP)
    assert opt.units and len(opt.units) < len(layer.modules)  # rank 0 updates its share only
    _steps_clean(opt, layer.params, grads=lambda: _meta_grads(layer))
