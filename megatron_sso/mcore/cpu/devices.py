"""Host stand-ins for CUDA devices, streams and events, used by :mod:`.cpu_mode`.

* :class:`CudaToCpuMode` is a ``TorchFunctionMode`` that sends every torch call naming a
  CUDA device to the CPU, so Megatron's ``device="cuda"``,
  ``device=torch.cuda.current_device()``, ``.cuda()`` and ``.to("cuda")`` work unchanged.
* :func:`enter_on_this_thread` enters that mode on the calling thread for good, and arranges
  for a thread other than the main one to leave it as the thread ends (below).
* :class:`HostStream` and :class:`HostEvent` replace ``torch.cuda.Stream`` / ``Event``:
  on the host every operation is already ordered, so waiting and recording do nothing.

Thread exit: torch keeps a thread's mode stack in C++ thread-local storage, whose destructor
drops the mode's Python reference *after* the thread's Python state is gone, taking the GIL to
do so. If the interpreter has started finalising by then, CPython ends that thread inside the
(noexcept) destructor and the process aborts ("terminate called without an active
exception"). So a thread other than the main one leaves the mode while its Python state is still
cleared (:class:`_LeaveAtThreadExit`); the main thread keeps it for good (its thread-locals are
destroyed after the interpreter, when torch skips the reference drop).
``tests/megatron/test_cpu_mode_thread_exit.py`` provokes that order.

Nothing here patches anything; :func:`megatron_sso.mcore.cpu.mode.enable_cpu_mode` does.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = ["CudaToCpuMode", "HostEvent", "HostStream", "enter_on_this_thread", "to_cpu_device"]

_CPU = torch.device("cpu")


def to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")`` or a
    bare index, which torch reads as an accelerator index) to the CPU device; return
    anything else (``"cpu"``, ``"meta"``, None, dtypes, ...) unchanged."""
    if isinstance(device, bool):  # bool is an int subclass and never a device
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _implicit_grads(tensors: tuple, grads: Any) -> tuple:
    """``torch.autograd.backward``'s rule for missing gradients: ones for scalars."""
    if grads is None:
        grads = (None,) * len(tensors)
    elif isinstance(grads, torch.Tensor):
        grads = (grads,)
    out = []
    for t, g in zip(tensors, grads):
        if g is None and t.requires_grad:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t, memory_format=torch.preserve_format)
        out.append(g)
    return tuple(out)


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU.

    Also: ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor itself,
    ``pin_memory=True`` becomes False (pinning needs an accelerator), and
    ``Tensor.record_stream`` does nothing. ``Tensor.type()`` without arguments reports the
    ``torch.cuda.*`` name, because Megatron's optimizer wrappers and grad clipping accept
    only ``torch.cuda.{Float,Half,BFloat16}Tensor`` parameters.
    """

    _BACKWARD = (torch.Tensor.backward, torch.autograd.backward)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._BACKWARD:
            return self._backward(func, args, kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(
                to_cpu_device(a) if isinstance(a, (str, torch.device)) or type(a) is int else a
                for a in args
            )
        return func(*args, **kwargs)

    def _backward(self, func, args, kwargs):
        """Run a backward pass with this mode active.

        A mode's handler runs with the mode popped, so calling ``func`` here would run the
        whole backward pass (Megatron's custom autograd functions, tensor-parallel
        collectives that allocate on ``torch.cuda.current_device()``, DDP grad hooks)
        *without* the CUDA-to-CPU mapping. Instead the autograd engine is called directly,
        as Megatron's own ``custom_backward`` does, with the mode pushed again.
        """
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if func is torch.Tensor.backward:
            tensors, grads = (a["self"],), a["gradient"]
        else:
            tensors, grads = _as_tuple(a["tensors"]), a["grad_tensors"]
            if grads is not None and not isinstance(grads, torch.Tensor):
                grads = tuple(grads)
        inputs = _as_tuple(a.get("inputs"))
        if not all(isinstance(t, torch.Tensor) for t in tensors + inputs):
            return func(*args, **kwargs)  # GradientEdge / dict inputs: torch's own path
        create_graph = bool(a["create_graph"])
        retain_graph = create_graph if a["retain_graph"] is None else a["retain_graph"]
        with self:
            torch.autograd.Variable._execution_engine.run_backward(
                tensors, _implicit_grads(tensors, grads), retain_graph, create_graph, inputs,
                allow_unreachable=True, accumulate_grad=True,
            )


class _LeaveAtThreadExit:
    """Held only by a ``threading.local``: CPython clears a thread's locals on that thread,
    with the GIL, as the thread ends, so ``__del__`` pops the device mode from the thread's
    torch-function stack before torch's C++ thread-local destructor could need the GIL (see
    the module docstring)."""

    def __init__(self, mode: CudaToCpuMode) -> None:
        self.mode = mode

    def __del__(self) -> None:
        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is self.mode:  # never pop a mode pushed after ours
            self.mode.__exit__(None, None, None)


_THREAD = threading.local()


def enter_on_this_thread(mode: CudaToCpuMode) -> None:
    """Enter ``mode`` on the calling thread and leave it active; on a thread other than the
    main one it is left again as the thread ends (module docstring, "Thread exit")."""
    mode.__enter__()
    if threading.current_thread() is not threading.main_thread():
        _THREAD.leave = _LeaveAtThreadExit(mode)


class HostStream(torch.Stream):
    """Stand-in for ``torch.cuda.Stream``: a CPU ``torch.Stream`` (so that C++ signatures
    such as ``Tensor.record_stream`` accept it) that waits for nothing."""

    def __new__(cls, device: Any = None, priority: int = 0, **kwargs: Any) -> "HostStream":
        return super().__new__(cls, device="cpu")

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> "HostEvent":
        return event if event is not None else HostEvent()


class HostEvent(torch.cpu.Event):
    """Stand-in for ``torch.cuda.Event``. ``elapsed_time`` is 0.0: there is no device
    time to measure (Megatron's own timers use host wall-clock time)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        pass

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0
