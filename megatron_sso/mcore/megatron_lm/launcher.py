"""``python -m megatron_sso.megatron_lm``: Megatron-LM's training loop with our optimizers.

Two ways to run it, chosen here:

* ``MEGATRON_LM_DIR`` names a Megatron-LM checkout (tag core_v0.16.1): its own
  ``pretrain_gpt.py`` runs with our hooks (:func:`~.hooks.run_megatron_lm_script`);
* unset, and the installed megatron-core ships ``megatron.training`` (0.19 wheels do): the
  built-in GPT script (:mod:`.builtin_gpt`, our providers in :mod:`.gpt_providers`) runs
  Megatron-LM's ``pretrain()`` from the wheel, no checkout needed.

Either way ``--optimizer sso | muon_sphere | signum | ademamix`` and the ``--sso-*`` /
``--spectra-*`` flags are available (``adam`` with ``--spectra-post-clip`` is SPECTRA too) and
every other argument is Megatron-LM's own. Launch problems are one line (exit code 2). See
docs/megatron.md, "Megatron-LM users".
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


def choose(environ: Mapping[str, str] = os.environ, builtin_problem: Optional[str] = None) -> Optional[Path]:
    """The checkout's ``pretrain_gpt.py`` when ``MEGATRON_LM_DIR`` is set, None for the built-in
    script. LaunchError when neither can run: the variable names no checkout, or it is unset and
    ``builtin_problem`` (default: :func:`~.builtin_gpt.builtin_unavailable`) says why the wheel
    cannot serve."""
    if environ.get(ENV_VAR, "").strip():
        return find_script(environ)
    if builtin_problem is None:
        from .builtin_gpt import builtin_unavailable

        builtin_problem = builtin_unavailable()
    if builtin_problem:
        raise LaunchError(f"{ENV_VAR} is not set and the built-in GPT script cannot run ({builtin_problem}): "
                          "point it at a Megatron-LM checkout (git clone https://github.com/NVIDIA/Megatron-LM "
                          "-b core_v0.16.1), or install megatron-core 0.19 (scripts/install.sh --python 3.12)")
    return None


def main(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> int:
    """Choose the script (:func:`choose`), then run it with ``argv`` (default: this process's
    arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script = choose(environ)
        if script is None:
            from .builtin_gpt import run_builtin_gpt

            run_builtin_gpt(argv)
        else:
            from .hooks import run_megatron_lm_script

            run_megatron_lm_script(script, argv)
    except LaunchError as exc:
        print(f"megatron_sso.megatron_lm: {exc}", file=sys.stderr)
        return 2
    return 0
