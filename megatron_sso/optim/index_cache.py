"""Index tensors built once per optimizer, for the per-module gathers and scatters of a step.

``torch.tensor(list, device=cuda)`` copies from pageable host memory and so synchronises with the
host on every call (issue 13 item 6); the lists a step indexes with (the members of a same-shape
bucket, the modules to skip) are the same every step, so each is made on its device once.
"""

from __future__ import annotations

import torch


class IndexCache:
    """``cache(idx, device)``: ``idx`` (a list of ints) as a long tensor on ``device``, made on
    first use and kept (the key is the tuple and the device)."""

    def __init__(self) -> None:
        self._tensors: dict[tuple, torch.Tensor] = {}

    def __call__(self, idx, device) -> torch.Tensor:
        key = (tuple(idx), torch.device(device))
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return self._tensors[key]
