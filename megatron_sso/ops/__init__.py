"""Pure tensor math of SSO and its relatives (imports torch only, never torch.distributed).

Every function is batched over leading dimensions and takes optional tensor-parallel hooks
(``allreduce``, ``partition_dim``) so that :mod:`megatron_sso.distributed` can run the same
code on a sharded matrix.
"""

from .lambda_solver import (
    LambdaSolution,
    TangentResidual,
    add_rank1,
    cold_slope,
    initial_slope,
    lambda_bound,
    solve_lambda_bisect,
    solve_lambda_secant,
    uv_inner,
)
from .newton_schulz import COEFFICIENT_SETS, DEFAULT_STEPS, msign, resolve_coefficients
from .power_iteration import block_power_iteration, default_start_vector, power_iteration
from .spectral_clip import hard_spectral_clip, soft_spectral_clip, spectra_update_scale
from .retraction import retraction_factor, spectral_mup_init_, target_radius, update_scale

__all__ = [
    "COEFFICIENT_SETS",
    "DEFAULT_STEPS",
    "LambdaSolution",
    "TangentResidual",
    "add_rank1",
    "block_power_iteration",
    "default_start_vector",
    "cold_slope",
    "initial_slope",
    "lambda_bound",
    "msign",
    "power_iteration",
    "resolve_coefficients",
    "retraction_factor",
    "solve_lambda_bisect",
    "solve_lambda_secant",
    "spectral_mup_init_",
    "target_radius",
    "hard_spectral_clip",
    "soft_spectral_clip",
    "spectra_update_scale",
    "update_scale",
    "uv_inner",
]
