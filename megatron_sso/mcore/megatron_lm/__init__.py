"""Megatron-LM's own training loop with our optimizers.

:mod:`.launcher` runs a checkout's ``pretrain_gpt.py`` (``MEGATRON_LM_DIR``) or, without one,
:mod:`.builtin_gpt` (Megatron-LM's loop from the megatron-core 0.19 wheel with our providers in
:mod:`.gpt_providers`), with :mod:`.hooks` installed: ``--optimizer sso | muon_sphere | signum | ademamix`` and the ``--sso-*`` /
``--spectra-*`` flags of :mod:`.args` (generated from the settings tables), copied onto the
``OptimizerConfig`` Megatron-LM builds; :mod:`.cpu_mode` adds the CPU glue Megatron-LM needs
beyond :mod:`..cpu`. Callers: ``python -m megatron_sso.megatron_lm``, the core_v0.16.1 patch.
"""

from .. import lazy_face

FACE = {
    "launcher": ("ENV_VAR", "SCRIPT", "choose", "find_script", "main"),
    "builtin_gpt": ("builtin_unavailable", "run_builtin_gpt"),
    "hooks": ("LaunchError", "install_megatron_lm", "run_megatron_lm_script"),
    "args": ("add_sso_arguments", "add_spectra_arguments", "get_megatron_sso_optimizer"),
    "cpu_mode": ("enable_megatron_lm_cpu_mode",),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
