"""The torch optimizers under Megatron's wrappers step on the ``meta`` device (issue 13 item 1).

``MegatronSphere`` stacked a host ``torch.tensor(float(len(idx)))`` with device tensors in its
per-kind statistics: SSO, MuonSphere and Muon through Megatron died at iteration 1 on CUDA while
every CPU test passed. On ``meta`` that mix raises like on CUDA, and
:class:`tests.device_guard.HostSyncGuard` records what would stall a GPU step; see
``tests/test_meta_device.py`` for the method. Covered: MegatronSphere (SSO, MuonSphere, Muon;
one process, TP duplicated mode and DP-sharded over torch's ``fake`` 2-rank process group),
MegatronSpectra (soft and hard clip, pre-clip), and the statistics the logging callbacks read.

The DP-sharded optimizer compares a fingerprint of its module list across the DP group when it
plans (one host read, once): it plans on CPU parameters, then every parameter is replaced by a
``meta`` one in its param group (the plan is positional), and the steps run on ``meta``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sso.mcore.optimizers.layouts import param_layout
from megatron_sso.mcore.optimizers.spectra_optimizer import MegatronSpectra
from megatron_sso.mcore.optimizers.sphere_optimizer import LAYOUT_ATTR, MegatronSphere
from megatron_sso.optim import AdamWConfig, SpectraConfig
from megatron_sso.optim.config import SphereConfig
from tests.device_guard import HostSyncGuard

META = torch.device("meta")
CFG = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=16, hidden_size=32,
                      ffn_hidden_size=48, gated_linear_unit=True)
NAMES = {"qkv": ("l.self_attention.linear_qkv.weight", (128, 32)),
         "fc1": ("l.mlp.linear_fc1.weight", (96, 32)),
         "proj": ("l.self_attention.linear_proj.weight", (32, 64))}
CHEAP = dict(power_iters_cold=2, power_iters=1)
BUILT_ONCE = ("optim/index_cache.py", "self._tp_index = ")
"""Index tensors cached by the first step (one host-to-device copy each, once per run)."""


def _params(device, tp: int = 1, row_parallel_proj: bool = False) -> list[torch.nn.Parameter]:
    out = []
    for key, (name, (m, n)) in NAMES.items():
        if key == "qkv":
            m //= tp
        elif key == "fc1":
            m //= tp
        else:
            n //= tp
        p = torch.nn.Parameter(torch.randn(m, n, device=device) / n ** 0.5 if device != META
                               else torch.empty(m, n, device=META))
        if key == "proj" and row_parallel_proj:
            p.tensor_model_parallel, p.partition_dim = True, 1
        setattr(p, LAYOUT_ATTR, param_layout(name, p, CFG, tp))
        out.append(p)
    return out


def _swap_to_meta(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Plan on CPU (``_build_domains``), then put ``meta`` parameters in the plan's places."""
    opt._domains = opt._build_domains()
    swapped = []
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            q = torch.nn.Parameter(torch.empty_like(p, device=META))
            for attr in (LAYOUT_ATTR, "tensor_model_parallel", "partition_dim"):
                if hasattr(p, attr):
                    setattr(q, attr, getattr(p, attr))
            group["params"][i] = q
            swapped.append(q)
    return swapped


def _steps_clean(opt, params, steps: int = 2) -> None:
    for step in range(steps):
        for p in params:
            p.grad = torch.empty_like(p)
        with HostSyncGuard(META) as guard:
            opt.step()
        guard.check(allowed=BUILT_ONCE if step == 0 else ())


@pytest.mark.parametrize("mode", ["sso", "muon_sphere", "muon"])
def test_megatron_sphere_one_process(mode):
    params = _params(META)
    opt = MegatronSphere([{"params": params, "lr": 1e-2, "weight_decay": 0.1}], SphereConfig(mode=mode, **CHEAP))
    _steps_clean(opt, params)
    assert all(v.device == META for v in opt._stats.values())  # statistics stay on the device


def test_megatron_sphere_with_a_missing_gradient():
    params = _params(META)
    opt = MegatronSphere([{"params": params, "lr": 1e-2}], SphereConfig(**CHEAP))
    for step in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        params[1].grad = None  # skipped by the update (flag built on the device)
        with HostSyncGuard(META) as guard:
            opt.step()
        guard.check(allowed=BUILT_ONCE if step == 0 else ())


@pytest.mark.parametrize("mode", ["sso", "muon"])
def test_megatron_sphere_dp_sharded_and_tp_duplicated(fake_world, mode):
    params = _params("cpu", tp=2, row_parallel_proj=True)
    opt = MegatronSphere([{"params": params, "lr": 1e-2, "weight_decay": 0.1}], SphereConfig(mode=mode, **CHEAP),
                         tp_groups={"dense": fake_world}, dp_groups={"dense": fake_world}, dp_shard=True)
    params = _swap_to_meta(opt)
    assert opt._domains[0].sharded and 0 < len(opt._domains[0].owned) < len(opt._domains[0].mods)
    _steps_clean(opt, params)


@pytest.mark.parametrize("clip", ["soft", "hard"])
def test_megatron_spectra(clip, fake_world):
    params = _params(META, tp=2, row_parallel_proj=True)
    opt = MegatronSpectra([{"params": params, "lr": 1e-2, "weight_decay": 0.1}],
                          SpectraConfig(base="adamw", clip=clip, pre_clip=True), AdamWConfig(),
                          tp_groups={"dense": fake_world})
    for step in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        with HostSyncGuard(META) as guard:
            opt.pre_clip_gradients_()
            opt.step()
        # the hard clip min(sigma, c) needs the exact spectrum: one SVD per same-shape batch
        allowed = (("ops/spectral_clip_hard.py",) if clip == "hard" else ()) + (BUILT_ONCE if step == 0 else ())
        guard.check(allowed=allowed)


def test_statistics_reads_are_the_designed_ones():
    """What reading the statistics costs (on CPU, where the values exist), which the logging
    callbacks pay once per log interval: ``MegatronSphere.last_step_stats`` and ``kind_stats``
    one ``tolist`` each per domain, ``MegatronSpectra.last_step_stats`` one per module kind;
    no tensor made without ``device=``."""
    params = _params("cpu")
    opt = MegatronSphere([{"params": params, "lr": 1e-2}], SphereConfig(**CHEAP))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with HostSyncGuard("cpu") as guard:
        stats, kinds = opt.last_step_stats, opt.kind_stats()
    assert stats["num_matrices"] == 8 + 2 + 1 and set(kinds) == {"qkv_q", "qkv_k", "qkv_v", "gate", "up",
                                                                "linear_proj"}
    assert [what for what, _ in guard.events] == ["Tensor.tolist of a device tensor"] * 2, guard.events

    params = _params("cpu")
    sp = MegatronSpectra([{"params": params, "lr": 1e-2}], SpectraConfig(base="adamw", clip="soft"), AdamWConfig())
    for p in params:
        p.grad = torch.randn_like(p)
    sp.step()
    with HostSyncGuard("cpu") as guard:
        stats = sp.last_step_stats
    assert stats["num_matrices"] == 8 + 2 + 1
    assert [what for what, _ in guard.events] == ["Tensor.tolist of a device tensor"] * 6, guard.events
