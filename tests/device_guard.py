"""Catch, on a CPU-only machine, what would break or stall an optimizer step on a GPU.

Two tools, used together by ``tests/test_meta_device.py`` and
``tests/megatron/test_megatron_meta_device.py``:

* **the meta device.** A step whose parameters, gradients and state live on ``meta`` runs
  every shape and device check of the real step (``torch.stack``, ``torch.where``, indexing
  refuse a non-scalar tensor from another device exactly as on CUDA) and every host read
  (``.item()``, ``bool()``, ``.tolist()``) raises, because a meta tensor has no values. Every
  op the optimizers use has a meta kernel, linear algebra included, so the whole step runs.
* :class:`HostSyncGuard`, which records what the meta device lets through but a GPU would
  pay for with a host synchronisation: linear algebra whose CUDA kernel checks its ``info``
  on the host (``torch.linalg.cholesky``, ``svd``, ``eigh``, ``eig``: their meta kernels
  skip the check), data-dependent shapes (``nonzero``, boolean-mask indexing, ``unique``),
  copies between the host and the device, ``torch.tensor(data, device=...)`` (a pageable
  host-to-device copy), and any factory call without ``device=`` (a tensor silently made on
  the host).

Reading a CPU tensor (the host-side ``step`` count of :class:`MegatronSphere`) is not a
device synchronisation and is not recorded.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING_OPS = {
    aten._local_scalar_dense.default: "host read of a device value (.item(), bool(), float())",
    aten.is_nonzero.default: "host read of a device value (bool())",
    aten._linalg_check_errors.default: "linalg error check (reads info on the host)",
    aten._linalg_svd.default: "SVD (cuSOLVER checks convergence on the host)",
    aten._linalg_eigh.default: "eigh (checks info on the host)",
    aten.linalg_eig.default: "eig (checks info on the host)",
    aten.nonzero.default: "data-dependent shape (nonzero)",
    aten.masked_select.default: "data-dependent shape (masked_select)",
    aten._unique2.default: "data-dependent shape (unique)",
    aten.unique_dim.default: "data-dependent shape (unique)",
    aten.unique_consecutive.default: "data-dependent shape (unique_consecutive)",
}

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.eye, torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm,
             torch.scalar_tensor, torch.empty_strided}
"""Functions that make a tensor from nothing: without ``device=`` it lands on the host."""

HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.cpu}


def _where() -> str:
    """The innermost frame of the product code that caused an event (for the message)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/megatron_sso/" in frame.filename:
            return f"{frame.filename.split('/megatron_sso/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


def _devices(obj) -> set[torch.device]:
    out = set()
    if isinstance(obj, torch.Tensor):
        out.add(obj.device)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            out |= _devices(x)
    return out


@dataclass
class HostSyncGuard:
    """Context manager recording ``(what, where)`` events for tensors on ``device``.

    ``events`` lists every recorded event in order; :meth:`check` raises with all of them.
    """

    device: torch.device
    events: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        guard = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in SYNCING_OPS:
                    on_device = guard.device in _devices(list(args))
                    if on_device or func is aten._linalg_check_errors.default:
                        guard.events.append((SYNCING_OPS[func], _where()))
                elif func in (aten._to_copy.default, aten.copy_.default):
                    src = args[1] if func is aten.copy_.default else args[0]
                    dst = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
                    pair = {src.device.type, torch.device(dst).type}
                    if pair == {"cpu", guard.device.type} and len(pair) == 2:
                        guard.events.append((f"copy {src.device.type} -> {torch.device(dst).type}", _where()))
                elif func is aten.index.Tensor and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                    guard.events.append(("data-dependent shape (boolean-mask indexing)", _where()))
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in FACTORIES:
                    dev = kwargs.get("device")
                    if dev is None:
                        guard.events.append((f"torch.{func.__name__} without device= (made on the host)", _where()))
                    elif func in (torch.tensor, torch.as_tensor) and torch.device(dev).type == guard.device.type \
                            and guard.device.type != "cpu":
                        guard.events.append((f"torch.{func.__name__}(host data, device=...): a host-to-device copy",
                                             _where()))
                elif func in HOST_READS and args and isinstance(args[0], torch.Tensor) \
                        and args[0].device == guard.device:
                    guard.events.append((f"Tensor.{func.__name__} of a device tensor", _where()))
                return func(*args, **kwargs)

        self._modes = (_Function(), _Dispatch())

    def __enter__(self) -> "HostSyncGuard":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def check(self, allowed: tuple[str, ...] = ()) -> None:
        """Raise unless every event's place contains one of ``allowed`` (syncs a path pays by
        design, e.g. the SVD of SPECTRA's hard clip)."""
        events = [(w, at) for w, at in self.events if not any(a in at for a in allowed)]
        if events:
            lines = "\n".join(f"  {what}  at {where}" for what, where in events)
            raise AssertionError(f"{len(events)} host synchronisation(s) or host tensors in the step:\n{lines}")
