"""Training-health monitoring for any optimizer: losses, spectral norms, update and activation RMS.

Why: the paper's claim is that SSO keeps every atomic module's spectral norm on its sphere
(``sigma / R = 1``) and so keeps activations bounded, while AdamW / Muon let weights drift. To
*show* that next to the loss curves, the same quantities must be measured the same way for
every optimizer -- not read from the SSO optimizer's own statistics (AdamW has none). So this
module reads the model itself:

* spectral norm ``sigma`` of every atomic module (each Q head, K / V group, SwiGLU gate and up,
  ``linear_proj``, ``linear_fc2``; :func:`~.layouts.param_layout`) by exact SVD, divided by the
  sphere radius ``R = sqrt(d_out / d_in)`` -- every ``interval`` steps (the model is tiny; for a
  big one raise the interval);
* update RMS ``rms(W_t - W_{t-1})`` per module kind on those same steps (a copy of the 2-D
  weights is taken at the step's start, only on monitored steps);
* with ``activations`` on: RMS and max-abs of each attention and MLP block's output, from
  forward hooks that accumulate device tensors (no host sync inside the forward pass) and are
  read once per monitored step;
* with ``router`` on (MoE models): each MoE layer's router *MaxVio* on monitored steps,
  ``(max_i load_i - mean_i load_i) / mean_i load_i`` over the experts, where ``load_i`` is the
  number of token-to-expert assignments the router made to expert ``i`` in that iteration
  (all micro-batches; the maximal-violation measure of the paper's MoE results, SPEC §7).
  It is 0 for perfect balance and at most ``E / k - 1`` (``E`` experts, top-``k``: one expert
  can take at most every token once);
* training loss every step and validation loss at every Bridge evaluation.

Off by default and free when off: nothing is registered unless :func:`callbacks_from_env`
finds ``MEGATRON_SSO_MONITOR`` (a JSON-lines output path) in the environment, which
``megatron-sso pretrain`` honours -- and sets itself from a recipe's ``monitor:`` section
(``path``, ``interval``, ``activations``, ``router``; ``megatron_sso.cli.recipe``).
``MEGATRON_SSO_MONITOR_INTERVAL`` (default 10), ``MEGATRON_SSO_MONITOR_ACTIVATIONS`` and
``MEGATRON_SSO_MONITOR_ROUTER`` (0/1, default 1) tune it. Only the last rank writes (it holds
the reduced loss); the spectral and activation numbers are those of its own model chunk
(single-process runs: the whole model), the router loads are summed over the router's
tensor x data x context-parallel group first, so MaxVio is that of the global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from typing import Any, Optional

import torch

ENV_PATH = "MEGATRON_SSO_MONITOR"
ENV_INTERVAL = "MEGATRON_SSO_MONITOR_INTERVAL"
ENV_ACTIVATIONS = "MEGATRON_SSO_MONITOR_ACTIVATIONS"
ENV_ROUTER = "MEGATRON_SSO_MONITOR_ROUTER"


def _unwrap(model_chunk: Any) -> Any:
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


def _matrices(model: list) -> list[tuple[str, torch.Tensor]]:
    """The 2-D hidden-layer weights (embeddings and output layer are AdamW's in every optimizer)."""
    out = []
    for chunk in model:
        for name, p in _unwrap(chunk).named_parameters():
            if p.dim() == 2 and "decoder.layers" in name and "router" not in name:
                out.append((name, p))
    return out


@torch.no_grad()
def spectral_snapshot(model: list, split: bool = True) -> dict[str, float]:
    """Per module kind: mean / max / min of ``sigma / R`` over the atomic modules, by exact SVD."""
    from ...ops.retraction import target_radius
    from ..optimizers import param_layout

    cfg = _unwrap(model[0]).config
    ratios: dict[str, list[float]] = defaultdict(list)
    for name, p in _matrices(model):
        try:
            mods = param_layout(name, p, cfg, 1, split_qkv=split, split_glu=split).modules
        except ValueError:
            continue
        for mod in mods:
            w = mod.view(p.data).float()
            sigma = torch.linalg.matrix_norm(w, ord=2).item()
            ratios[mod.kind].append(sigma / target_radius(*w.shape))
    out = {}
    for kind, vals in ratios.items():
        out[f"sigma_over_R/{kind}/mean"] = sum(vals) / len(vals)
        out[f"sigma_over_R/{kind}/max"] = max(vals)
        out[f"sigma_over_R/{kind}/min"] = min(vals)
    return out


_NORM_GAINS = (("input_layernorm.weight", "attn"), ("linear_qkv.layer_norm_weight", "attn"),
               ("pre_mlp_layernorm.weight", "mlp"), ("linear_fc1.layer_norm_weight", "mlp"))
"""Pre-attention / pre-MLP norm gains, local and Transformer-Engine (fused) names."""


@torch.no_grad()
def norm_gains(model: list) -> dict[str, float]:
    """``norm_gain/<layer>.<attn|mlp>``: RMS of the gain of the norm in front of each block.

    A sphere bounds ``||W||_2``, not these 1-D gains (AdamW's, with every optimizer), and a block's
    output scales with them -- a SwiGLU MLP's quadratically -- so activation growth under SSO is
    read against them."""
    out = {}
    for chunk in model:
        for name, p in _unwrap(chunk).named_parameters():
            if "decoder.layers." not in name:
                continue
            for suffix, block in _NORM_GAINS:
                if name.endswith(suffix):
                    layer = name.split("decoder.layers.")[-1].split(".")[0]
                    out[f"norm_gain/{layer}.{block}"] = float(p.detach().float().square().mean().sqrt())
    return out


class ActivationHooks:
    """Forward hooks on every ``self_attention`` and ``mlp`` block: running sum of squares,
    element count and max-abs of the block output, kept on the device until :meth:`read`."""

    def __init__(self, model: list) -> None:
        self.acc: dict[str, list] = {}
        self.active = False  # switched on only for monitored steps: other forwards pay nothing
        self.handles = []
        for chunk in model:
            for name, mod in _unwrap(chunk).named_modules():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("self_attention", "mlp") and "decoder.layers" in name:
                    key = f"{name.split('decoder.layers.')[-1].split('.')[0]}.{'attn' if leaf == 'self_attention' else 'mlp'}"
                    self.handles.append(mod.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not self.active or not module.training:  # evaluation forwards are not training ones
                return
            y = output[0] if isinstance(output, (tuple, list)) else output
            y = y.detach().float()
            sq, n, mx = (y * y).sum(), y.numel(), y.abs().max()
            if key in self.acc:
                a = self.acc[key]
                a[0] += sq
                a[1] += n
                a[2] = torch.maximum(a[2], mx)
            else:
                self.acc[key] = [sq, n, mx]
        return hook

    def read(self) -> dict[str, float]:
        """``act_rms/<layer>.<attn|mlp>`` and ``act_maxabs/...`` since the last read; resets."""
        out = {}
        for key, (sq, n, mx) in sorted(self.acc.items()):
            out[f"act_rms/{key}"] = math.sqrt(float(sq) / max(n, 1))
            out[f"act_maxabs/{key}"] = float(mx)
        self.acc.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer: ``(max_i load_i - mean load) / mean load`` over the experts' loads
    (token-to-expert assignment counts); NaN when no token was routed."""
    load = load.double()
    mean = load.mean()
    return float((load.max() - mean) / mean) if float(mean) > 0 else float("nan")


class RouterHooks:
    """Forward hooks on every MoE router (Megatron's ``Router``, whose forward returns
    ``(probs, routing_map)``, ``routing_map`` a ``[tokens, experts]`` boolean mask after any
    capacity dropping): per-expert assignment counts summed over the monitored iteration's
    training forwards, kept on the device until :meth:`read`.

    The router is hooked rather than the token dispatcher because every dispatcher
    (allgather, alltoall, flex) consumes the same ``routing_map``, and the router is where
    Megatron itself counts loads for its balancing losses. A recomputed forward (activation
    recomputation) counts every token twice, which MaxVio, a ratio, does not see."""

    def __init__(self, model: list) -> None:
        from megatron.core.transformer.moe.router import Router

        self.routers: list[tuple[str, Any]] = []
        self.acc: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = []
        for c, chunk in enumerate(model):
            for name, mod in _unwrap(chunk).named_modules():
                if isinstance(mod, Router):
                    key = name.split("decoder.layers.")[-1].split(".")[0] if "decoder.layers." in name else name
                    key = f"{c}/{key}" if len(model) > 1 else key  # virtual pipeline chunks
                    self.routers.append((key, mod))
                    self.handles.append(mod.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not self.active or not module.training:
                return
            counts = output[1].detach().sum(dim=0)
            self.acc[key] = self.acc[key] + counts if key in self.acc else counts
        return hook

    def read(self) -> dict[str, float]:
        """``maxvio/<layer>`` for every router since the last read; resets. Every rank of the
        routers' tensor x data x context-parallel group must call it on the same step (it
        all-reduces the counts so that MaxVio is the global batch's)."""
        if not self.routers:
            return {}
        first = self.routers[0][1]
        zeros = torch.zeros(first.config.num_moe_experts, dtype=torch.float64, device=first.weight.device)
        loads = torch.stack([self.acc[k].to(torch.float64) if k in self.acc else zeros for k, _ in self.routers])
        group = getattr(self.routers[0][1], "tp_dp_cp_group", None)
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(loads, group=group)
        self.acc.clear()
        return {f"maxvio/{key}": max_violation(load) for (key, _), load in zip(self.routers, loads)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def monitoring_callback(path: str, interval: int = 10, activations: bool = True, router: bool = True):
    """A Megatron-Bridge ``Callback`` writing one JSON line per event to ``path``:
    ``{"kind": "train", "step", "loss", "lr", "step_s", "step_cpu_s", "tokens", ...monitored values}``
    (``step_cpu_s``: this process's CPU seconds, all threads -- less sensitive than wall time to
    other jobs on a shared machine) and
    ``{"kind": "val", "step", "loss"}``. ``router``: MaxVio of MoE routers (nothing on a dense
    model)."""
    import torch.distributed as dist
    from megatron.bridge.training.callbacks import Callback

    interval = max(1, int(interval))

    class Monitoring(Callback):
        def __init__(self) -> None:
            self.file = None
            self.hooks: Optional[ActivationHooks] = None
            self.routers: Optional[RouterHooks] = None
            self.before: dict[str, torch.Tensor] = {}
            self.t0 = self.c0 = 0.0
            self.monitored = False

        def _writer(self) -> bool:
            return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1

        def _emit(self, rec: dict) -> None:
            if self.file is not None:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()

        def on_train_start(self, context) -> None:
            if self._writer():
                self.file = open(path, "a", encoding="utf-8")
            if activations:
                self.hooks = ActivationHooks(context.model)
            if router:
                self.routers = RouterHooks(context.model)

        @staticmethod
        def _step(context) -> int:
            return int(context.state.train_state.step) + 1  # incremented after the callbacks

        def on_train_step_start(self, context) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            self.monitored = monitored = self._step(context) % interval == 0 or self._step(context) == 1
            if monitored:
                self.before = {n: p.detach().float().clone() for n, p in _matrices(context.model)}
            for hooks in (self.hooks, self.routers):
                if hooks is not None:
                    hooks.active = monitored

        def on_train_step_end(self, context) -> None:
            step = self._step(context)
            cfg = context.state.cfg
            loss = context.loss_dict.get("lm loss") if context.loss_dict else None
            groups = getattr(context.optimizer, "param_groups", None) or []
            rec = {"kind": "train", "step": step, "loss": float(loss) if loss is not None else float("nan"),
                   "lr": max((g["lr"] for g in groups), default=float("nan")),
                   "step_s": time.perf_counter() - self.t0, "step_cpu_s": time.process_time() - self.c0,
                   "tokens": step * cfg.train.global_batch_size * cfg.model.seq_length}
            if self.monitored:
                self.monitored = False
                rec.update(self._update_rms(context.model))
                rec.update(spectral_snapshot(context.model))
                rec.update(norm_gains(context.model))
                for hooks in (self.hooks, self.routers):
                    if hooks is not None:
                        rec.update(hooks.read())
                self.before = {}
            self._emit(rec)

        def _update_rms(self, model: list) -> dict[str, float]:
            sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            for name, p in _matrices(model):
                if name in self.before:
                    d = p.detach().float() - self.before[name]
                    kind = name.rsplit(".", 2)[-2]
                    sums[kind][0] += float((d * d).sum())
                    sums[kind][1] += d.numel()
            return {f"update_rms/{k}": math.sqrt(s / max(n, 1)) for k, (s, n) in sums.items()}

        def on_eval_end(self, context) -> None:
            losses = context.total_loss_dict or {}
            if "lm loss" in losses:
                self._emit({"kind": "val", "step": int(context.state.train_state.step),
                            "loss": float(losses["lm loss"])})

        def on_train_end(self, context) -> None:
            for hooks in (self.hooks, self.routers):
                if hooks is not None:
                    hooks.remove()
            if self.file is not None:
                self.file.close()
                self.file = None

    return Monitoring()


def monitor_environment(path: str, interval: int = 10, activations: bool = True, router: bool = True) -> dict:
    """The environment variables that switch the monitor on in every rank started afterwards
    (how ``megatron-sso pretrain`` applies a recipe's ``monitor:`` section)."""
    return {ENV_PATH: str(path), ENV_INTERVAL: str(int(interval)),
            ENV_ACTIVATIONS: "1" if activations else "0", ENV_ROUTER: "1" if router else "0"}


def callbacks_from_env() -> list:
    """``[monitoring_callback(...)]`` when ``MEGATRON_SSO_MONITOR`` names an output file, else ``[]``."""
    path = os.environ.get(ENV_PATH)
    if not path:
        return []
    def flag(name: str) -> bool:
        return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off", "")

    return [monitoring_callback(path, int(os.environ.get(ENV_INTERVAL, "10")), flag(ENV_ACTIVATIONS),
                                flag(ENV_ROUTER))]
