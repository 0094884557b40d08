"""``AtomicModule``: one weight matrix with its own sphere, described as a *view* into a parameter.

Megatron fuses matrices that SSO treats separately (SPEC §3, paper §4.3): QKV is split per
head (each Q head, K group and V group is its own matrix), SwiGLU fc1 into gate and up, each
MoE expert is its own matrix; attention proj and fc2 stay whole. The Megatron layer describes
each of them with this descriptor; the optimizer updates it in place through the view.

Why views (SPEC pitfall 1): a reshape of a strided slice makes a copy and the update never
reaches the parameter. ``index`` therefore accepts only integers and slices with a positive
step (basic indexing, which always yields a view), an optional ``reshape`` is applied with
``Tensor.view`` (which raises instead of copying), and the constructor checks that the result
shares the parameter's storage. That covers Megatron's layouts (``mcore/layouts.py``): a QKV
head is ``reshape=(groups, rows_per_group, hidden), index=(g, slice(a, b))``; an expert of
a ``GroupedMLP`` weight is ``reshape=(E, hidden, -1), index=(e,), transpose=True``.

Why ``partition_dim`` (SPEC pitfall 4): with TP > 1 a column-parallel QKV holds whole heads on
each rank; such a module is *local* (``partition_dim=None``) and is updated with no
communication at all. Only a module whose rows or columns are split across the TP group
(gate/up halves of a column-parallel fc1: rows; proj and fc2: columns) has a partition dim.
Heads of different ranks are never gathered into one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .tensor_parallel import check_partition_dim

Tensor = torch.Tensor
Index = tuple[Union[int, slice], ...]


def _check_index(index: Index) -> None:
    if not isinstance(index, tuple):
        raise ValueError(f"index must be a tuple of ints and slices, got {index!r}")
    for item in index:
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            raise ValueError(f"index entries must be ints or slices (a view), got {item!r}")
        if isinstance(item, slice) and item.step is not None and item.step < 1:
            raise ValueError(f"index slices need a positive step, got {item!r}")


@dataclass(frozen=True, eq=False)
class AtomicModule:
    """One atomic module: ``param[index]`` (transposed if ``transpose``) is this rank's part of
    a ``full_shape = (d_out, d_in)`` matrix in ``torch.nn.Linear`` orientation.

    Attributes:
        param: the tensor holding the module (an fp32 master weight in Megatron).
        index: basic index into ``param`` (after ``reshape``) giving a 2-D view, e.g.
            ``(slice(0, 128),)`` for the first head of a fused QKV, or ``(3,)`` for expert 3
            of a 3-D expert tensor.
        full_shape: the unsharded ``(d_out, d_in)``; sets the radius ``R`` and scale ``s``.
        partition_dim: ``None`` if the module is whole on this rank (*local*); 0 if its rows
            are split across the tensor-parallel group, 1 if its columns are.
        tp_offset: first row (0) or column (1) of this rank's shard in the full module.
        transpose: the view is stored ``d_in x d_out`` (Megatron's legacy grouped-GEMM
            experts); the module is its transpose.
        expert: an MoE expert matrix: sharded over the expert-tensor-parallel and
            expert-data-parallel groups instead of the dense ones.
        name: for messages and reports.
        reshape: optional shape for ``param.view(...)`` before indexing (never copies).
    """

    param: Tensor
    index: Index
    full_shape: tuple[int, int]
    partition_dim: Optional[int] = None
    tp_offset: int = 0
    transpose: bool = False
    expert: bool = False
    name: str = ""
    reshape: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, torch.Tensor):
            raise ValueError(f"{self._who}: param must be a tensor, got {type(self.param).__name__}")
        _check_index(self.index)
        if self.reshape is not None and (not isinstance(self.reshape, tuple)
                                         or any(isinstance(d, bool) or not isinstance(d, int) for d in self.reshape)):
            raise ValueError(f"{self._who}: reshape must be a tuple of ints, got {self.reshape!r}")
        fs = self.full_shape
        if (not isinstance(fs, tuple) or len(fs) != 2
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in fs)):
            raise ValueError(f"{self._who}: full_shape must be two positive ints, got {fs!r}")
        check_partition_dim(self.partition_dim)
        try:
            view = self.weight()
        except (RuntimeError, IndexError) as err:
            raise ValueError(f"{self._who}: param{list(self.param.shape)} cannot be viewed as "
                             f"reshape={self.reshape!r}, index={self.index!r}: {err}") from None
        if view.dim() != 2:
            raise ValueError(f"{self._who}: param{self.index!r} is {view.dim()}-D, an atomic module is 2-D")
        if view.untyped_storage().data_ptr() != self.param.untyped_storage().data_ptr():
            raise ValueError(f"{self._who}: param{self.index!r} is not a view of the parameter")
        m, n = view.shape
        if self.partition_dim is None:
            if (m, n) != fs:
                raise ValueError(f"{self._who}: a local module's view {(m, n)} must equal full_shape {fs}")
            if self.tp_offset != 0:
                raise ValueError(f"{self._who}: a local module has tp_offset 0, got {self.tp_offset!r}")
        else:
            d = self.partition_dim
            if (m, n)[1 - d] != fs[1 - d]:
                raise ValueError(
                    f"{self._who}: view {(m, n)} must keep dim {1 - d} of full_shape {fs} whole "
                    f"(partition_dim={d})"
                )
            if not (isinstance(self.tp_offset, int) and 0 <= self.tp_offset
                    and self.tp_offset + (m, n)[d] <= fs[d]):
                raise ValueError(
                    f"{self._who}: tp_offset {self.tp_offset!r} + shard {(m, n)[d]} exceeds full size {fs[d]}"
                )

    @property
    def _who(self) -> str:
        return f"atomic module {self.name!r}" if self.name else "atomic module"

    @property
    def is_local(self) -> bool:
        """Whole on this rank: updated with no tensor-parallel communication."""
        return self.partition_dim is None

    @property
    def shape(self) -> tuple[int, int]:
        """This rank's ``(rows, cols)`` of the module (the shard's shape if split)."""
        m, n = self.weight().shape
        return int(m), int(n)

    def weight(self) -> Tensor:
        """The module as a view of ``param`` (``d_out x d_in`` orientation, detached)."""
        return self._select(self.param.detach())

    def grad(self, attr: str = "grad") -> Optional[Tensor]:
        """The same view into ``param.<attr>`` (``"main_grad"`` in Megatron), or ``None``."""
        g = getattr(self.param, attr, None)
        if g is None:
            return None
        if g.shape != self.param.shape:
            raise ValueError(f"{self._who}: {attr} has shape {tuple(g.shape)}, param {tuple(self.param.shape)}")
        return self._select(g.detach())

    def _select(self, t: Tensor) -> Tensor:
        if self.reshape is not None:
            t = t.view(self.reshape)
        view = t[self.index]
        return view.mT if self.transpose else view

    def signature(self) -> tuple:
        """What must agree between the ranks that share this module (for consistency checks)."""
        return (self.full_shape, self.partition_dim, self.expert, self.transpose)
