"""The real engine: a Megatron-Core GPT with the Dense-1.7B layer shapes trained on one device.

Path: megatron-core's ``GPTModel`` (local layer spec: no Transformer Engine on the GPU image),
``Float16Module`` + Megatron DDP, and the optimizer built by Megatron's factory for ``adam`` or by
ours (:func:`megatron_sso.mcore.optimizers.get_sphere_megatron_optimizer`, the function the
installed call-site wrap and the Bridge ``provide()`` hook both call) for the sphere names: the
same ``ChainedOptimizer`` of Megatron's ``Float16OptimizerWithFloat16Params`` (bf16 model, fp32
main params, global grad-norm clip) that a Bridge or Megatron-LM run gets. The loop is ours
(forward, backward, ``finish_grad_sync``, ``optimizer.step()``): Megatron-Bridge's closure needs
an sdist-only dependency (antlr4-python3-runtime 4.9.3, for omegaconf) that cannot be installed
on an offline machine from wheels, so the GPU check does not depend on Bridge.
"""

from __future__ import annotations

import gc
import os
import socket
import statistics
import time
from dataclasses import dataclass

import torch

from gpu_common import Sizes, synchronize

LR = {"adam": 1e-3, "sphere": 5e-3}
"""Learning rates: the sphere family at the paper's 5e-3 (SPEC §2), AdamW at 1e-3 (its usual
scale for a model this size). Constant: the check compares cost, the loss only shows training."""


@dataclass(frozen=True)
class EngineRun:
    """What one optimizer's run is: model depth, steps, precision, device."""

    optimizer: str
    """``adam`` (Megatron's) or one of ours (``SPHERE_OPTIMIZERS``)."""
    layers: int
    """Transformer layers of the Dense-1.7B shape."""
    steps: int
    """Optimizer steps (fewer if the time budget runs out; at least 2)."""
    bf16: bool
    """bf16 model with fp32 main params (Megatron's Float16 optimizer wrapper), else fp32."""


def our_muon_name() -> str:
    """The ``optimizer`` value that selects OUR Muon (``mode='muon'``): ``muon`` or, after a
    rename that leaves ``muon`` to Megatron's own, ``sso_muon``."""
    from megatron_sso.mcore.optimizers import SPHERE_OPTIMIZERS, sphere_config_from

    class Probe:
        def __init__(self, name):
            self.optimizer = name

    for name in SPHERE_OPTIMIZERS:
        if sphere_config_from(Probe(name)).mode == "muon":
            return name
    raise LookupError(f"no optimizer name selects our Muon among {SPHERE_OPTIMIZERS}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(device: torch.device) -> str:
    """A one-process world (NCCL on a GPU, gloo on the CPU) and Megatron's parallel state."""
    import torch.distributed as dist

    if device.type == "cpu":
        from megatron_sso.mcore.cpu import enable_cpu_mode

        enable_cpu_mode()
    else:
        torch.cuda.set_device(device)
    from megatron.core import parallel_state

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    return backend


def build_model(sizes: Sizes, layers: int, bf16: bool, device: torch.device, seed: int = 1234):
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=layers, hidden_size=sizes.hidden, ffn_hidden_size=sizes.ffn,
        num_attention_heads=sizes.heads, num_query_groups=sizes.kv_groups,
        kv_channels=sizes.hidden // sizes.heads, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, use_cpu_initialization=device.type == "cpu",
        init_method_std=0.02,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=sizes.vocab,
                     max_sequence_length=sizes.seq, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_base=1000000)
    model = model.to(device)
    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(name: str, model, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_sso.mcore.optimizers import SPHERE_OPTIMIZERS, get_sphere_megatron_optimizer

    ours = name in SPHERE_OPTIMIZERS
    config = OptimizerConfig(optimizer=name if ours else "adam", lr=LR["sphere" if ours else "adam"],
                             min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                             clip_grad=1.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=False)
    optimizer = get_sphere_megatron_optimizer(config, [model]) if ours else get_megatron_optimizer(config, [model])
    return optimizer, constant_schedule(optimizer, config.lr, config.weight_decay)


def constant_schedule(optimizer, lr: float, weight_decay: float):
    """Megatron's scheduler at a constant rate: it writes every group's ``lr`` (times the group's
    ``lr_mult``) and ``weight_decay`` (times ``wd_mult``: 0 for biases and norms) as in a real run;
    without it our sphere groups would keep their constructor default."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0,
                                   lr_decay_steps=10**6, lr_decay_style="constant", start_wd=weight_decay,
                                   end_wd=weight_decay, wd_incr_steps=10**6, wd_incr_style="constant")


def synthetic_batches(sizes: Sizes, count: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """``count`` fixed random token batches, cycled (the same data for every optimizer). One by
    default: the model memorises it, so the loss falls from ~ln(vocab) from the first steps and
    "the loss fell" is a check even in a 3-step dry run; the check measures cost, not quality."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, sizes.vocab, (sizes.micro_batch, sizes.seq + 1), generator=gen) for _ in range(count)]


def train(run: EngineRun, sizes: Sizes, device: torch.device, deadline: float) -> dict:
    """Train ``run.steps`` steps (stopping early at ``deadline``, after at least 2); per step the
    wall time, the optimizer-step time (both after a device synchronisation), the loss and, for
    our optimizers, the solver's msign calls per matrix."""
    model = build_model(sizes, run.layers, run.bf16, device)
    optimizer, scheduler = build_optimizer(run.optimizer, model, run.bf16)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    sphere = []
    if run.optimizer != "adam":
        from megatron_sso.mcore.observe.sphere_logging import sphere_optimizers

        sphere = sphere_optimizers(optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [b.to(device) for b in synthetic_batches(sizes)]
    position_ids = torch.arange(sizes.seq, device=device).unsqueeze(0).expand(sizes.micro_batch, -1)
    steps, losses, step_ms, opt_ms, msign_calls, skipped = 0, [], [], [], [], 0
    while steps < run.steps and (steps < 2 or time.time() < deadline):
        tokens = batches[steps % len(batches)]
        synchronize(device)
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(input_ids=tokens[:, :-1], position_ids=position_ids, attention_mask=None,
                     labels=tokens[:, 1:]).float().mean()
        loss.backward()
        model.finish_grad_sync()
        synchronize(device)
        t1 = time.perf_counter()
        ok, grad_norm, _ = optimizer.step()
        synchronize(device)
        t2 = time.perf_counter()
        scheduler.step(increment=1)
        skipped += 0 if ok else 1
        step_ms.append((t2 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        losses.append(float(loss.detach()))
        if sphere:
            stats = [s.last_step_stats for s in sphere]
            calls = sum(s["msign_calls"] for s in stats)
            msign_calls.append(calls / max(1, sum(s["num_matrices"] for s in stats)))
        steps += 1
    warm = slice(1, None) if steps > 1 else slice(None)  # the first step builds caches and workspaces
    out = {
        "optimizer": run.optimizer, "layers": run.layers, "bf16": run.bf16, "steps": steps,
        "lrs": lrs,
        "median_step_ms": statistics.median(step_ms[warm]), "median_opt_step_ms": statistics.median(opt_ms[warm]),
        "first_step_ms": step_ms[0], "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "skipped_steps": skipped, "msign_calls_per_matrix": msign_calls,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    del model, optimizer, scheduler, sphere
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def engine(device: torch.device, sizes: Sizes, layers: int, steps: int, bf16: bool, deadline: float) -> dict:
    """Every optimizer in turn, each given an equal share of the time left."""
    backend = init_world(device)
    import megatron.core

    names = ["adam", our_muon_name(), "muon_sphere", "sso"]
    runs, errors = [], {}
    for i, name in enumerate(names):
        share = (deadline - time.time()) / (len(names) - i)
        try:
            runs.append(train(EngineRun(name, layers, steps, bf16), sizes, device, time.time() + share))
        except Exception as exc:  # one optimizer's failure must not hide the others
            import traceback

            errors[name] = traceback.format_exc(limit=8)
            print(f"[engine] {name} failed: {exc!r}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    checks = []
    for r in runs:
        checks.append({"check": f"{r['optimizer']}: loss fell (last < first)", "value": r["loss_last"],
                       "limit": r["loss_first"], "rule": "<", "passed": bool(r["loss_last"] < r["loss_first"])})
    for name in errors:
        checks.append({"check": f"{name}: trained", "value": 0.0, "limit": 1.0, "rule": ">=", "passed": False})
    return {"backend": backend, "megatron_core": getattr(megatron.core, "__version__", "?"),
            "muon_name": names[1], "runs": runs, "errors": errors, "checks": checks}
