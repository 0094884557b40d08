"""DistributedSpectralSphere checkpoints: ``state_dict`` / ``load_state_dict`` round-trip.

The optimizer keeps its state per work unit (momentum, cached singular block, lambda, slope),
not per parameter, so torch's own ``state_dict`` was empty and a saved-and-loaded run
restarted cold (issue 13 item 9). Checked on one process (dense and expert domains, every unit
local): save after 2 steps through ``torch.save``, load into a fresh optimizer over fresh
parameters, continue 2 steps (warm: cached block, lambda and slope in use), and compare with 4
uninterrupted steps, bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch

from megatron_sso.optim import DistributedSpectralSphere
from tests.distributed import toy

EXPERTS = 2
LR = 0.05
FAST = {"power_iters_cold": 4, "lambda_cold_evals": 2}
"""Cheap cold start (as in test_data_parallel.py); the round trip does not depend on it."""


def _layer() -> "toy.ShardedLayer":
    return toy.ShardedLayer(toy.full_weights(experts=EXPERTS), experts=EXPERTS, mark_split_at_tp1=False)


def _steps(layer, opt, first: int, count: int) -> None:
    for step in range(first, first + count):
        layer.set_grads(toy.full_grads(step, experts=EXPERTS))
        opt.step()


def _weights(layer) -> list[torch.Tensor]:
    return [m.weight().detach().clone() for m in layer.modules]


def test_save_load_continue_equals_uninterrupted():
    ref_layer = _layer()
    ref = DistributedSpectralSphere(ref_layer.modules, lr=LR, **FAST)
    _steps(ref_layer, ref, 0, 4)

    layer = _layer()
    opt = DistributedSpectralSphere(layer.modules, lr=LR, **FAST)
    _steps(layer, opt, 0, 2)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    saved_weights = _weights(layer)

    fresh_layer = _layer()  # new parameters, new optimizer: only the checkpoint carries over
    for mod, w in zip(fresh_layer.modules, saved_weights):
        with torch.no_grad():
            mod.weight().copy_(w)
    fresh = DistributedSpectralSphere(fresh_layer.modules, lr=LR, **FAST)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    _steps(fresh_layer, fresh, 2, 2)
    for name, a, b in zip(fresh_layer.names, _weights(fresh_layer), _weights(ref_layer)):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())
    assert fresh.last_step_stats["msign_calls_per_matrix"] == ref.last_step_stats["msign_calls_per_matrix"]
    assert len(sd["unit_state"]) == len(opt.units) == len(layer.modules)


def test_load_refuses_state_of_other_units():
    layer = _layer()
    opt = DistributedSpectralSphere(layer.modules, lr=LR, **FAST)
    _steps(layer, opt, 0, 1)
    sd = opt.state_dict()
    dense_only = toy.ShardedLayer(toy.full_weights(), mark_split_at_tp1=False)
    other = DistributedSpectralSphere(dense_only.modules, lr=LR, **FAST)
    with pytest.raises(ValueError, match="does not update"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="no 'unit_state'"):
        other.load_state_dict(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0).state_dict())
