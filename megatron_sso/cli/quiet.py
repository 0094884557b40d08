"""The warnings every ``megatron-sso`` start printed that say nothing to its user, silenced by
their exact text; every other warning still shows (Python's default filters).

Found by running the tiny dense, MoE and two-rank DeepNet recipes with ``-W default`` on the
CPU stack (torch 2.13.0, megatron-core 0.16.1, megatron-bridge 0.3.1). The filters go into this
process and, through ``PYTHONWARNINGS`` (whose message field is the literal start of the
message), into the ranks it starts. Bridge's ``Deleting CUDA graphs`` line is a ``print``, not
a warning; CPU mode drops it (``megatron_sso.mcore.cpu``, ``bridge_quiet_cuda_graph_cleanup``).
"""

from __future__ import annotations

import os
import re
import warnings

KNOWN_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    ("The pynvml package is deprecated", FutureWarning,
     "pynvml's own import shim (nvidia-resiliency-ext requires the package), raised when torch.cuda imports it; "
     "torch uses nvidia-ml-py, which is installed"),
    ("Transformer Engine and Apex are not installed", UserWarning,
     "megatron-core's torch fallbacks, the ones CPU mode (and any machine without TE/apex) runs"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "the same, for the norms"),
    ("The legacy GroupedMLP will be deprecated", UserWarning,
     "printed at import by the TE spec provider; the recipes use no grouped GEMM (moe_grouped_gemm false)"),
    ("full scope is deprecated", UserWarning,
     "Megatron's own default cuda_graph_scope; no CUDA graph is captured unless cuda_graph_impl is set"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
     "torch 2.13 renamed the collectives megatron-core 0.16.1 calls"),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning, "the same (sequence parallelism)"),
    ("'pin_memory' argument is set as true but no accelerator is found", UserWarning,
     "Megatron's data loader asks for pinned memory; there is none to pin on a CPU"),
    ("Function 'pretrain' is experimental", UserWarning, "Bridge marks its own pretrain() at every call"),
)
"""(start of the message, category, why it is harmless)."""


def quiet_known_noise() -> None:
    """Ignore exactly :data:`KNOWN_NOISE`, here and in child processes."""
    entries = []
    for text, category, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(text), category=category)
        entries.append(f"ignore:{text}:{category.__name__}")
    current = os.environ.get("PYTHONWARNINGS", "")
    missing = [e for e in entries if e not in current.split(",")]
    if missing:
        os.environ["PYTHONWARNINGS"] = ",".join(([current] if current else []) + missing)
