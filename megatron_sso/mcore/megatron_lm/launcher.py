"""Find Megatron-LM's ``pretrain_gpt.py`` and run it with our hooks (``python -m megatron_sso.megatron_lm``).

Runs ``pretrain_gpt.py`` from the Megatron-LM checkout named by ``MEGATRON_LM_DIR`` (tag
core_v0.16.1) with ``--optimizer sso | muon_sphere | signum | ademamix`` and the ``--sso-*`` /
``--spectra-*`` flags available (``adam`` with ``--spectra-post-clip`` is SPECTRA too); every
other argument is Megatron-LM's own. The hooks live in :mod:`.hooks` (flags and checks in
:mod:`.args`); this module only finds the script and reports launch problems in one line (exit
code 2). See docs/megatron.md, "Megatron-LM users".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .hooks import LaunchError

ENV_VAR = "MEGATRON_LM_DIR"
SCRIPT = "pretrain_gpt.py"


def find_script(environ: Mapping[str, str] = os.environ) -> Path:
    """``$MEGATRON_LM_DIR/pretrain_gpt.py``; LaunchError when the variable is unset or empty,
    or the file is not there."""
    root = environ.get(ENV_VAR, "").strip()
    if not root:
        raise LaunchError(f"{ENV_VAR} is not set: point it at a Megatron-LM checkout (git clone "
                          "https://github.com/NVIDIA/Megatron-LM -b core_v0.16.1)")
    script = Path(root).expanduser().resolve() / SCRIPT
    if not script.is_file():
        raise LaunchError(f"{ENV_VAR}={root}: no {SCRIPT} there; is it a Megatron-LM checkout?")
    return script


def main(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> int:
    """Find the script, then run it with ``argv`` (default: this process's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script = find_script(environ)
        from .hooks import run_megatron_lm_script

        run_megatron_lm_script(script, argv)
    except LaunchError as exc:
        print(f"megatron_sso.megatron_lm: {exc}", file=sys.stderr)
        return 2
    return 0
