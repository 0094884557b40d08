"""CPU mode: unit checks of the patches, then Megatron-Bridge's real pretrain() on CPU.

Each check runs in a fresh process: CPU mode is process-wide and Megatron keeps global
state. The Bridge runs need megatron-core 0.16.1 + megatron-bridge 0.3.1
(``scripts/install.sh``) and are skipped when they are missing. Availability is checked
with ``find_spec``, not by importing: without transformer-engine, ``import megatron.bridge``
only works once CPU mode has installed its stubs, which must not happen in pytest's process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

from tests.needs import MEGATRON, needs

CUDA_FREE = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="CPU mode only applies without CUDA"
)


NEEDS_MEGATRON = needs(*MEGATRON)


def _run_python(code: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout


@CUDA_FREE
def test_cpu_mode_maps_cuda_calls_to_host():
    out = _run_python(
        """
        import torch
        from megatron_sso.mcore.cpu.mode import enable_cpu_mode, cpu_mode_enabled, cpu_mode_report
        assert not cpu_mode_enabled()
        assert enable_cpu_mode() is True and enable_cpu_mode() is True   # idempotent
        report = cpu_mode_report()
        assert report.enabled and "redirect_cuda_devices" in report.applied, report
        assert report.applied.count("redirect_cuda_devices") == 1
        assert torch._C._len_torch_function_stack() == 1                  # entered once

        cpu = torch.device("cpu")
        assert torch.zeros(2, device="cuda").device == cpu
        assert torch.empty(2, device=torch.cuda.current_device()).device == cpu
        assert torch.ones(2).cuda().device == cpu
        assert torch.ones(2).to("cuda:1").device == cpu
        assert torch.ones(2).to(torch.device("cuda"), torch.float64).dtype == torch.float64
        assert torch.ones(2).pin_memory().device == cpu
        assert not torch.empty(2, pin_memory=True).is_pinned()
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        assert torch.ones(2).type(torch.float64).dtype == torch.float64  # conversion untouched
        assert not torch.cuda.is_available() and torch.cuda.device_count() == 0

        torch.cuda.synchronize(); torch.cuda.set_device(1); torch.cuda.empty_cache()
        assert torch.cuda.memory_allocated() == 0 and torch.cuda.max_memory_allocated() == 0
        stream = torch.cuda.Stream()
        event = torch.cuda.Event(enable_timing=True)
        event.record(); stream.wait_stream(torch.cuda.current_stream()); stream.synchronize()
        with torch.cuda.stream(stream):
            x = torch.ones(3, device="cuda")
        x.record_stream(stream)
        assert event.elapsed_time(event) == 0.0

        # The "CUDA" RNG is the CPU generator: seeding it reproduces CPU draws.
        torch.cuda.manual_seed(7); a = torch.rand(3)
        torch.cuda.manual_seed(7); b = torch.rand(3)
        assert torch.equal(a, b)
        state = torch.cuda.get_rng_state(); c = torch.rand(3)
        torch.cuda.set_rng_state(state); assert torch.equal(c, torch.rand(3))

        # Backward runs with the mode active (custom Functions allocating on "cuda").
        class Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t * 2
            @staticmethod
            def backward(ctx, g):
                return g * 2 + torch.zeros(g.shape, device="cuda")
        for run in (lambda y: y.sum().backward(), lambda y: torch.autograd.backward(y, torch.ones(3))):
            leaf = torch.ones(3, requires_grad=True)
            run(Scale.apply(leaf))
            assert torch.equal(leaf.grad, torch.full((3,), 2.0))

        # The device mode is per thread: a later enable_cpu_mode() call activates it there.
        import threading
        seen = []
        def worker():
            enable_cpu_mode()
            seen.append(torch.zeros(1, device="cuda").device)
        t = threading.Thread(target=worker); t.start(); t.join()
        assert seen == [cpu], seen
        print("OK", flush=True)
        """
    )
    assert out.strip().endswith("OK")


def test_cpu_mode_never_touches_a_cuda_process():
    out = _run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True          # pretend to be a GPU machine
        before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream)
        from megatron_sso.mcore.cpu.mode import enable_cpu_mode, cpu_mode_enabled, cpu_mode_report
        assert enable_cpu_mode() is False and not cpu_mode_enabled()
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream) == before
        assert torch._C._len_torch_function_stack() == 0
        assert cpu_mode_report().applied == ()
        print("OK")
        """
    )
    assert out.strip().endswith("OK")


# ----------------------------------------------------------------- Bridge's real pretrain()


def _check_training(run) -> list[float]:
    losses = run.losses
    assert sorted(losses) == [1, 2, 3, 4], losses
    values = [losses[i] for i in sorted(losses)]
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0] - 0.05, f"loss did not decrease: {values}"
    for rank in run.ranks:
        assert rank.cpu_mode and not rank.skipped_iterations, rank
        assert all(math.isfinite(g) and g > 0 for g in rank.grad_norms.values()), rank.grad_norms
    return values


@pytest.fixture(scope="module")
def single_rank_run():
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    return run_pretrain(TinyGPTSpec(train_iters=4), world_size=1, timeout_s=240)


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_pretrain_adam_one_rank(single_rank_run):
    _check_training(single_rank_run)
    rank = single_rank_run.ranks[0]
    # Every Megatron module patch found its module on the pretrain() path (applied, or skipped as
    # not needed: define_te_general_gemm on megatron-core >= 0.17, which defines the name itself).
    assert rank.cpu_mode_pending == [], rank.cpu_mode_pending
    for name in ("stub_bridge_te_modules", "redirect_cuda_devices", "bridge_initialize_without_cuda",
                 "bridge_seed_rng_tracker", "bridge_skip_jit_warmup", "cuda_rng_tracker_on_cpu",
                 "skip_compile_helpers_when_prebuilt"):
        assert any(p.split(" ")[0] == name for p in rank.cpu_mode_patches), (name, rank.cpu_mode_patches)


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_pretrain_adam_two_ranks_data_parallel(single_rank_run):
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    run = run_pretrain(TinyGPTSpec(train_iters=4), world_size=2, timeout_s=240)
    values = _check_training(run)
    assert run.ranks[0].losses == run.ranks[1].losses  # DP-reduced loss on every rank
    # Same global batch split over 2 gloo ranks: the same training trajectory as 1 rank.
    single = [single_rank_run.losses[i] for i in sorted(single_rank_run.losses)]
    assert values == pytest.approx(single, rel=1e-4)


@CUDA_FREE
@NEEDS_MEGATRON
@pytest.mark.megatron
@pytest.mark.distributed
def test_bridge_pretrain_adam_tensor_and_sequence_parallel():
    """TP=2 with sequence parallelism: TP collectives in forward and backward, and the
    torch norms that CPU mode lets run on sequence-sharded activations."""
    from megatron_sso.mcore.bridge.runner import TinyGPTSpec, run_pretrain

    spec = TinyGPTSpec(train_iters=4, tensor_parallel=2, overrides=("model.sequence_parallel=true",))
    _check_training(run_pretrain(spec, world_size=2, timeout_s=240))
