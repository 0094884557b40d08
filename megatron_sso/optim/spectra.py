"""SPECTRA: spectral post-clipping of AdamW / Signum / AdEMAMix updates, and gradient pre-clipping.

SPECTRA (Jiang, Semenov & Stich, arXiv 2603.14315, ICML 2026; SPEC §5) keeps a base optimiser
and replaces, for every 2-D hidden weight ``W`` (``d_out x d_in``), its update by a spectrally
clipped one; 1-D parameters and embeddings keep the base update. One step is

    D = base direction (per unit lr, no weight decay),   W <- (1 - lr wd) W - lr s H_c(D),

with ``H_c`` the soft clip ``sigma -> sigma / sqrt(1 + sigma^2/c^2)`` (default) or the hard clip
``min(sigma, c)`` (:mod:`megatron_sso.ops.spectral_clip`) and ``s = sqrt(max(1, d_out/d_in))``.

What is clipped, and why that way
---------------------------------
Each base optimiser exposes a functional ``*_direction_(grad, state, cfg)`` that advances its
state and returns ``D``: the step it would take per unit learning rate, *excluding* the weight
decay. SPECTRA clips ``D`` and then applies ``lr`` and the decoupled decay itself. We do not
diff weights (``W_before - W_after``) because that mixes in the decay, loses precision in
bf16/fp32 weights when ``lr`` is small, and needs a copy of every weight. ``c`` is therefore in
the units of ``D`` (an Adam/Signum direction has entries of size ~1, so its spectral norm is
``O(sqrt(d))``: ``c = 5`` or ``10`` bites), and the clip does not depend on ``lr`` or its
schedule: the spectral ball is fixed, the schedule scales the step inside it.

Frank-Wolfe reading (our derivation of the paper's "composite Frank-Wolfe step"): with
``gamma = lr wd`` the step is ``W <- (1 - gamma) W + gamma V``, ``V = -(s / wd) H_c(D)``, and
``||V||_2 <= s c / wd``. So each step is a convex combination towards a point of the spectral
ball of radius ``s c / wd``, and ``||W||_2 <= max(||W_0||_2, s c / wd)`` for ever whenever
``lr wd <= 1`` (``tests/test_spectra.py`` checks it).

Pre-clipping (optional, off by default): :func:`pre_clip_gradients_` soft-clips raw 2-D
gradients with ``c = 0.1`` *before* global-norm clipping, to suppress sparse spectral spikes.
The optimiser cannot do this inside ``step()`` (global-norm clipping has already run by then),
so a training loop calls ``Spectra.pre_clip_gradients_()`` or the function, then
``clip_grad_norm_``. Under data parallelism it must run after the gradient all-reduce (the clip
of a sum is not the sum of clips).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, NamedTuple, Optional

import torch

from ..ops.power_iteration import power_iteration
from ..ops.spectral_clip import AllReduce, hard_spectral_clip, soft_spectral_clip, spectra_update_scale
from .ademamix import AdEMAMixConfig, ademamix_direction_, ademamix_init_state
from .direction_optimizer import ConfigFields, check_learning_rate, run_closure
from .signum import SignumConfig, signum_direction_, signum_init_state

Tensor = torch.Tensor
BaseName = Literal["adamw", "signum", "ademamix"]
ClipMode = Literal["soft", "hard", "none"]

DEFAULT_CLIP_C: dict[str, float] = {"cosine": 5.0, "wsd": 10.0}
"""SPECTRA's released post-clip levels per learning-rate schedule (SPEC §5): 5 with a cosine
schedule, 10 with warmup-stable-decay."""

DEFAULT_PRE_CLIP_C = 0.1
"""SPECTRA's pre-clip level for raw gradients (SPEC §5)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


# --------------------------------------------------------------------------- AdamW core


@dataclass(frozen=True)
class AdamWConfig(ConfigFields):
    """AdamW hyper-parameters (Loshchilov & Hutter, ICLR 2019). Defaults are the LLM setting of
    SPEC §3 (the paper's AdamW: beta 0.9/0.95, eps 1e-8, weight decay 0.1), not torch's."""

    beta1: float = 0.9
    """First-moment EMA coefficient (SPEC §3: 0.9)."""

    beta2: float = 0.95
    """Second-moment EMA coefficient (SPEC §3: 0.95; torch's default 0.999 is the non-LLM one)."""

    eps: float = 1e-8
    """Added to ``sqrt(v_hat)`` (SPEC §3 and Adam: 1e-8)."""

    weight_decay: float = 0.1
    """Decoupled weight decay ``wd`` in ``W <- (1 - lr wd) W`` (SPEC §3: 0.1)."""

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (0.0 <= value < 1.0):
                raise ValueError(f"AdamW {name} must be in [0, 1), got {value!r}")
        for name in ("eps", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"AdamW {name} must be a finite number >= 0, got {value!r}")


def adamw_init_state(p: Tensor) -> dict[str, Any]:
    """Step 0 and zero moments of ``p``'s shape and dtype (torch AdamW's key names)."""
    return {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def adamw_direction_(grad: Tensor, state: dict[str, Any], cfg: AdamWConfig) -> Tensor:
    """Advance AdamW's moments one step; return ``D = m_hat / (sqrt(v_hat) + eps)``."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = grad.to(m.dtype)
    state["step"] += 1
    t = state["step"]
    m.mul_(cfg.beta1).add_(g, alpha=1.0 - cfg.beta1)
    v.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
    denom = (v / (1.0 - cfg.beta2**t)).sqrt_().add_(cfg.eps)
    return (m / (1.0 - cfg.beta1**t)).div_(denom)


class BaseRule(NamedTuple):
    """A base optimiser as SPECTRA sees it: its config class and functional core."""
    config: type
    init_state: Callable[[Tensor], dict[str, Any]]
    direction_: Callable[[Tensor, dict[str, Any], Any], Tensor]


BASE_OPTIMIZERS: dict[str, BaseRule] = {
    "adamw": BaseRule(AdamWConfig, adamw_init_state, adamw_direction_),
    "signum": BaseRule(SignumConfig, signum_init_state, signum_direction_),
    "ademamix": BaseRule(AdEMAMixConfig, ademamix_init_state, ademamix_direction_),
}
"""Base optimisers SPECTRA can wrap; each ``direction_`` returns the update per unit lr
without weight decay (see the module docstring)."""


# --------------------------------------------------------------------------- config


def _check_level(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SpectraConfig(ConfigFields):
    """SPECTRA's own settings; the base optimiser's live in its config (e.g. :class:`AdamWConfig`)."""

    base: BaseName = "adamw"
    """Base optimiser whose update is clipped: ``adamw``, ``signum`` or ``ademamix``. One per
    optimiser (its state layout depends on it)."""

    clip: ClipMode = "soft"
    """Post-clip of 2-D updates: ``soft`` ``sigma / sqrt(1 + sigma^2/c^2)`` (SPECTRA's default;
    matmul-only, Newton-Schulz), ``hard`` ``min(sigma, c)`` (exact, needs an SVD), or ``none``:
    the group is not spectrally controlled at all (embeddings; also skips pre-clipping)."""

    c: float = DEFAULT_CLIP_C["cosine"]
    """Post-clip level, a singular value of the per-unit-lr update ``D``. SPECTRA's released
    values: 5 with a cosine lr schedule (default), 10 with WSD (:data:`DEFAULT_CLIP_C`). A
    param-group key, so a scheduler may change it between steps."""

    clip_steps: int = 10
    """Newton-Schulz steps of the soft clip (SPECTRA: ~10; every compute dtype converges in 10,
    see :data:`megatron_sso.ops.spectral_clip.DEFAULT_SOFT_CLIP_STEPS`)."""

    clip_dtype: Literal["fp32", "bf16", "fp64"] = "fp32"
    """Compute dtype of the clip: fp32 (default; ~0.1 u kappa relative error, ~1e-5 on LLM-sized
    update spectra), bf16 (cheaper; 0.5-2% only for mild spectra) or fp64; see
    :mod:`megatron_sso.ops.spectral_clip`. ``hard`` runs its SVD in fp32 for bf16."""

    shape_scale: bool = True
    """Multiply the clipped update by ``sqrt(max(1, d_out/d_in))`` (SPECTRA's released scripts;
    Muon's shape rule, :func:`megatron_sso.ops.spectra_update_scale`)."""

    pre_clip: bool = False
    """Soft-clip raw 2-D gradients before global-norm clipping (SPECTRA: optional, off). Applied
    by :meth:`Spectra.pre_clip_gradients_`, which the training loop calls before
    ``clip_grad_norm_``; ``step()`` never does it."""

    pre_clip_c: float = DEFAULT_PRE_CLIP_C
    """Pre-clip level, a singular value of the raw gradient (SPECTRA: 0.1)."""

    stats_power_iters: int = 4
    """Power iterations per clipped matrix for the ``||D||_2`` estimate in
    :attr:`Spectra.last_step_stats`; 0 turns it off. 4 cost 1-2% of one soft clip and
    land within 9% below the truth on random-sign updates, the gapless worst case (measured,
    CPU, 256-1024 wide; 8 iterations: within 5%). A lower bound, so ``num_clipped`` can undercount."""

    def __post_init__(self) -> None:
        if self.base not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {self.base!r}; choose one of {sorted(BASE_OPTIMIZERS)}")
        if self.clip not in ("soft", "hard", "none"):
            raise ValueError(f"unknown clip mode {self.clip!r}; choose 'soft', 'hard' or 'none'")
        _check_level(self.c, "c")
        _check_level(self.pre_clip_c, "pre_clip_c")
        if self.clip_dtype not in _DTYPES:
            raise ValueError(f"clip_dtype must be one of {sorted(_DTYPES)}, got {self.clip_dtype!r}")
        if isinstance(self.clip_steps, bool) or not isinstance(self.clip_steps, int) or self.clip_steps < 1:
            raise ValueError(f"clip_steps must be a positive integer, got {self.clip_steps!r}")
        iters = self.stats_power_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"stats_power_iters must be a non-negative integer, got {iters!r}")
        for name in ("shape_scale", "pre_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def clip_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.clip_dtype]


# --------------------------------------------------------------------------- functional core


def spectra_clip_update(D: Tensor, cfg: SpectraConfig, *, shape: Optional[tuple[int, int]] = None,
                        allreduce: Optional[AllReduce] = None, partition_dim: Optional[int] = None) -> Tensor:
    """``s H_c(D)`` for a (batch of) update(s) ``D`` of shape ``(..., d_out, d_in)``.

    ``shape`` is the full ``(d_out, d_in)`` when ``D`` is a tensor-parallel shard (``allreduce``
    and ``partition_dim`` as in :func:`~megatron_sso.ops.soft_spectral_clip`; soft clip only).
    """
    if cfg.clip == "none":
        return D
    d_out, d_in = shape if shape is not None else (D.size(-2), D.size(-1))
    if cfg.clip == "soft":
        H = soft_spectral_clip(D, cfg.c, steps=cfg.clip_steps, compute_dtype=cfg.clip_torch_dtype,
                               allreduce=allreduce, partition_dim=partition_dim)
    else:
        if allreduce is not None:
            raise ValueError("clip='hard' has no tensor-parallel form (it needs an SVD); use clip='soft'")
        svd_dtype = torch.float64 if cfg.clip_dtype == "fp64" else torch.float32
        H = hard_spectral_clip(D, cfg.c, compute_dtype=svd_dtype)
    return H * spectra_update_scale(d_out, d_in) if cfg.shape_scale else H


def _buckets(items: list[tuple[Tensor, Tensor]], batched: bool) -> list[list[tuple[Tensor, Tensor]]]:
    if not batched:
        return [[item] for item in items]
    by_key: dict[tuple, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for p, t in items:
        by_key[(tuple(t.shape), t.device, t.dtype)].append((p, t))
    return list(by_key.values())


def pre_clip_gradients_(params: Iterable[Tensor], c: float = DEFAULT_PRE_CLIP_C, *, steps: int = 10,
                        compute_dtype: torch.dtype = torch.float32, batched: bool = True) -> int:
    """SPECTRA pre-clipping: soft-clip, in place, the gradient of every 2-D tensor in ``params``.

    Call it on the hidden matrices (not embeddings) after the data-parallel gradient reduction
    and *before* global-norm clipping (SPEC §5). Same-shape gradients are clipped as one batch.
    A non-finite gradient stays non-finite, so Megatron's inf/NaN check still sees it.

    Returns:
        The number of gradients clipped.
    """
    level = _check_level(c, "pre-clip c")
    grads = [(p, p.grad) for p in params if p.grad is not None and p.grad.dim() == 2]
    for bucket in _buckets(grads, batched):
        X = torch.stack([g for _, g in bucket])
        H = soft_spectral_clip(X, level, steps=steps, compute_dtype=compute_dtype)
        for i, (_, g) in enumerate(bucket):
            g.copy_(H[i])
    return len(grads)


# --------------------------------------------------------------------------- stats


@dataclass
class SpectraStats:
    """One step's totals, kept on the device until read (reading synchronises once)."""

    num_matrices: int = 0
    num_unclipped: int = 0
    sigmas: list[Tensor] = dataclasses.field(default_factory=list)
    """Per bucket, ``(B, 3)``: estimated ``||D||_2``, ``||s H_c(D)||_2``, and 1.0 where above ``c``."""
    _cache: Optional[dict[str, float]] = None

    def as_dict(self) -> dict[str, float]:
        if self._cache is None:
            out: dict[str, float] = {"num_matrices": self.num_matrices, "num_unclipped": self.num_unclipped}
            if self.sigmas:
                x = torch.cat([t.to(self.sigmas[0].device) for t in self.sigmas])
                vals = torch.stack([x[:, 2].sum(), x[:, 0].mean(), x[:, 0].max(), x[:, 1].mean()]).tolist()
                out.update(num_clipped=int(vals[0]), mean_sigma_pre=vals[1], max_sigma_pre=vals[2],
                           mean_sigma_post=vals[3])
            self._cache = out
        return dict(self._cache)


# --------------------------------------------------------------------------- optimizer


class Spectra(torch.optim.Optimizer):
    """AdamW / Signum / AdEMAMix with SPECTRA post-clipping of every 2-D parameter's update.

    Args:
        params: tensors or param groups. 2-D tensors of groups with ``clip != "none"`` are
            clipped; other tensors take the base step unchanged. Put embeddings (and anything
            else to leave alone) in a group with ``clip="none"``, e.g. with
            :func:`spectra_param_groups`.
        lr: learning rate (> 0); 1e-3 is Adam's default step size -- use your base recipe's.
        base: ``"adamw"``, ``"signum"`` or ``"ademamix"``.
        batched: clip same-shape matrices of a group as one batch.
        **options: any :class:`SpectraConfig` field (``clip``, ``c``, ``clip_steps``,
            ``clip_dtype``, ``shape_scale``, ``pre_clip``, ``pre_clip_c``, ...) or field of the
            base's config (:class:`AdamWConfig`, :class:`~megatron_sso.optim.signum.SignumConfig`,
            :class:`~megatron_sso.optim.ademamix.AdEMAMixConfig`; e.g. ``weight_decay``).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, base: str = "adamw",
                 batched: bool = True, **options: Any) -> None:
        check_learning_rate(lr)
        if base not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {base!r}; choose one of {sorted(BASE_OPTIMIZERS)}")
        self._rule = BASE_OPTIMIZERS[base]
        valid = set(SpectraConfig.field_names()) | set(self._rule.config.field_names())
        unknown = set(options) - valid
        if unknown:
            raise ValueError(f"unknown Spectra option(s) {sorted(unknown)} for base {base!r}; valid: {sorted(valid)}")
        cfg = SpectraConfig(base=base, **{k: v for k, v in options.items() if k in SpectraConfig.field_names()})
        base_cfg = self._rule.config(**{k: v for k, v in options.items() if k in self._rule.config.field_names()})
        defaults = {**dataclasses.asdict(cfg), **dataclasses.asdict(base_cfg), "lr": lr, "batched": batched}
        super().__init__(params, defaults)
        self._last_stats: Optional[SpectraStats] = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        cfg = SpectraConfig.from_mapping(group)  # validates the group's overrides
        if cfg.base != self.defaults["base"]:
            raise ValueError(f"a param group cannot change the base optimizer ({cfg.base!r} vs "
                             f"{self.defaults['base']!r}); use one Spectra per base")
        self._rule.config.from_mapping(group)
        check_learning_rate(group["lr"])

    @property
    def last_step_stats(self) -> dict[str, float]:
        """What the last ``step()`` measured: ``num_matrices`` (updates clipped),
        ``num_unclipped`` (base steps), and with ``stats_power_iters > 0``: ``num_clipped``
        (matrices whose estimated ``||D||_2`` exceeded ``c``), ``mean_sigma_pre`` and
        ``max_sigma_pre`` (estimated ``||D||_2``), ``mean_sigma_post`` (``||s H_c(D)||_2``,
        obtained as ``s f(sigma_pre)``: both clips are monotone in ``sigma``)."""
        return self._last_stats.as_dict() if self._last_stats is not None else {}

    @torch.no_grad()
    def pre_clip_gradients_(self) -> int:
        """Pre-clip the 2-D gradients of every group with ``pre_clip`` on and ``clip != "none"``
        (call before ``clip_grad_norm_``). Returns the number of gradients clipped."""
        count = 0
        for group in self.param_groups:
            cfg = SpectraConfig.from_mapping(group)
            if cfg.pre_clip and cfg.clip != "none":
                count += pre_clip_gradients_(group["params"], cfg.pre_clip_c, steps=cfg.clip_steps,
                                             compute_dtype=cfg.clip_torch_dtype, batched=group["batched"])
        return count

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = run_closure(closure)
        stats = SpectraStats()
        for group in self.param_groups:
            cfg = SpectraConfig.from_mapping(group)
            base_cfg = self._rule.config.from_mapping(group)
            lr, wd = group["lr"], base_cfg.weight_decay
            pending: list[tuple[Tensor, Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Spectra does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._rule.init_state(p))
                direction = self._rule.direction_(p.grad, state, base_cfg)
                if cfg.clip != "none" and p.dim() == 2:
                    pending.append((p, direction))
                else:
                    _apply_(p, direction, lr, wd)
                    stats.num_unclipped += 1
            for bucket in _buckets(pending, group["batched"]):
                D = torch.stack([d for _, d in bucket])
                _record(stats, D, cfg)
                H = spectra_clip_update(D, cfg)
                for i, (p, _) in enumerate(bucket):
                    _apply_(p, H[i], lr, wd)
        self._last_stats = stats
        return loss


def _apply_(p: Tensor, update: Tensor, lr: float, wd: float) -> None:
    """``p <- (1 - lr wd) p - lr update`` (decoupled, lr-scaled decay as AdamW)."""
    if wd:
        p.mul_(1.0 - lr * wd)
    p.add_(update, alpha=-lr)


def _record(stats: SpectraStats, D: Tensor, cfg: SpectraConfig) -> None:
    stats.num_matrices += D.size(0)
    if cfg.stats_power_iters == 0:
        return
    sigma = power_iteration(D, iters=cfg.stats_power_iters)[0].float()
    if cfg.clip == "soft":
        post = sigma / torch.sqrt(1.0 + (sigma / cfg.c) ** 2)
    else:
        post = sigma.clamp_max(cfg.c)
    scale = spectra_update_scale(D.size(-2), D.size(-1)) if cfg.shape_scale else 1.0
    stats.sigmas.append(torch.stack([sigma, post * scale, (sigma > cfg.c).float()], dim=-1))


def spectra_param_groups(model: torch.nn.Module, unclipped: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a clipped group and a ``clip="none"`` group.

    Unclipped: parameters of ``nn.Embedding``/``nn.EmbeddingBag`` modules (SPECTRA leaves
    embeddings alone), and any parameter whose qualified name equals an entry of ``unclipped``
    or starts with ``entry + "."`` (e.g. ``"lm_head"``; SSO keeps the output layer on AdamW,
    SPEC §3). 1-D parameters may stay in the clipped group: only 2-D ones are clipped.
    Empty groups are dropped; a tied weight appears once.
    """
    prefixes = tuple(unclipped)
    skip = {id(p) for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            for p in m.parameters(recurse=False)}
    clipped, passthrough = [], []
    for name, p in model.named_parameters():
        named = any(name == q or name.startswith(q + ".") for q in prefixes)
        (passthrough if named or id(p) in skip else clipped).append(p)
    groups = [{"params": clipped}, {"params": passthrough, "clip": "none"}]
    return [g for g in groups if g["params"]]
