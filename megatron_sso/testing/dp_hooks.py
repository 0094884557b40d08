"""Setup hooks and probes for the data-parallel sharding tests (run through
:func:`.bridge_runner.run_pretrain`; see ``tests/megatron/test_sso_dp_pretrain.py``).

``install_nan_on_one_rank``: :func:`.testing_hooks.install_same_init`, and at the sphere step of
iteration :data:`NAN_ITERATION` global rank 1 alone writes a NaN into the gradient of the first
dense atomic module that data-parallel rank 0 owns. The gradient is already DDP's all-reduced
one, so only that rank sees the NaN (a rank-local fault): without agreement the owner would
update the module and the rank that saw the NaN would not know.

``dp_probe``: :func:`.sphere_logging.probe` plus a SHA-256 of every model parameter (to compare
ranks bit for bit) and, when a module was poisoned, the hash of its weight view.
"""

from __future__ import annotations

import functools
import hashlib

NAN_ITERATION = 2
"""Iteration (1-based, = sphere step count) at which rank 1 poisons a gradient."""


def _poisoned_module(opt):
    """``(param, module)`` of the first dense module owned by DP rank 0 (every rank agrees)."""
    domain = next(d for d in opt._domains if d.name == "dense")
    i = domain.owner.index(0) if domain.sharded else 0
    return opt._param(domain.refs[i]), domain.mods[i]


def install_nan_on_one_rank() -> None:
    import torch.distributed as dist

    from ..mcore.optimizers.sphere_optimizer import MegatronSphere
    from .bridge_hooks import install_same_init

    install_same_init()
    original = MegatronSphere.step
    if getattr(original, "_megatron_sso_nan", False):
        return

    @functools.wraps(original)
    def step(self, closure=None):
        self._test_calls = getattr(self, "_test_calls", 0) + 1
        if self._test_calls == NAN_ITERATION and self._domains and any(d.name == "dense" for d in self._domains):
            p, mod = _poisoned_module(self)
            self._test_poisoned = mod.name
            if dist.get_rank() == 1:
                mod.view(p.grad)[0, 0] = float("nan")
        return original(self, closure)

    step._megatron_sso_nan = True
    MegatronSphere.step = step


def _sha(t) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def dp_probe(context) -> dict:
    from ..mcore.observe.sphere_logging import probe, sphere_optimizers

    out = probe(context)
    digest = hashlib.sha256()
    for chunk in context.model:
        for name, p in chunk.named_parameters():
            digest.update(name.encode())
            digest.update(_sha(p).encode())
    out["param_sha"] = digest.hexdigest()
    for opt in sphere_optimizers(context.optimizer):
        if opt._domains and any(d.name == "dense" for d in opt._domains):
            p, mod = _poisoned_module(opt)
            out["watched_module"] = mod.name
            out["watched_sha"] = _sha(mod.view(p.data))
            out["poisoned"] = getattr(opt, "_test_poisoned", None)
    return out
