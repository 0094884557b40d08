"""One frozen configuration for every sphere-family optimizer (SSO, MuonSphere, Muon, Muon-Hyperball).

Recipes choose values; behaviour lives in code. Each field's default is the paper's choice
(Xie et al., arXiv 2601.08393, §6.1 and the released scripts; SPEC §2) unless it says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..ops.newton_schulz import COEFFICIENT_SETS
from .direction_optimizer import ConfigFields

Mode = Literal["sso", "muon_sphere", "muon", "hyperball"]
MODES = ("sso", "muon_sphere", "muon", "hyperball")
LambdaSolver = Literal["secant", "bisect", "krylov"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class SphereConfig(ConfigFields):
    """Hyper-parameters of one sphere-family optimizer (the learning rate lives in the param group)."""

    mode: Mode = "sso"
    """``sso``: retract, then the tangent steepest direction ``msign(M + lambda* Theta)``;
    ``muon_sphere``: retract, then ``msign(M)`` (lambda = 0); ``muon``: ``msign(M)`` with no
    retraction (the baseline); ``hyperball``: Muon-Hyperball (arXiv 2606.16899), the Frobenius
    sphere ``W <- R normalize(W - lr R normalize(msign(M)))`` with ``R`` each module's initial
    Frobenius norm (see ``radius_scaler`` and :mod:`megatron_sso.optim.hyperball`)."""

    momentum: float = 0.9
    """EMA coefficient beta of the momentum ``m <- beta m + (1 - beta) g`` (paper: 0.9)."""

    nesterov: bool = True
    """Use ``(1 - beta) g + beta m`` instead of ``m`` as the direction's input (paper: on)."""

    msign_steps: int = 8
    """Newton-Schulz iterations per msign (paper: 8)."""

    msign_coefficients: str = "sso8"
    """Newton-Schulz coefficient set, see :data:`megatron_sso.ops.COEFFICIENT_SETS`."""

    msign_dtype: str = "fp32"
    """Compute dtype of msign: ``fp32`` (default; keeps the lambda solve honest at tol 2e-4)
    or ``bf16`` (the released code; shifts ``h`` by ~1e-3, SPEC §2)."""

    msign_method: str = "standard"
    """``standard``: Newton-Schulz on the matrix (the paper's); ``gram``: on its small Gram
    matrix, with SSO's two evaluations sharing one Gram and one final product
    (:mod:`megatron_sso.ops.gram_residual`): ~1.5x MuonSphere's cost instead of ~2x on wide
    per-head shapes, at fp32 precision of squared singular values (computes in fp32)."""

    power_dtype: str = "fp32"
    """Compute dtype of the power iteration (the paper suggests bf16)."""

    power_iters: int = 8
    """Block power iterations per step on the updated weight, warm-started from the cached
    block; their top Ritz value is the sigma the weight is retracted with. SSO flattens the
    top of the spectrum (tens of singular values within 1% of R), so the estimate converges
    slowly and can only under-estimate, leaving the weight above its sphere. Measured worst
    ``|sigma/R - 1|`` by exact SVD: 300 steps of a 2x128 byte-level GPT at lr 0.05 -- block 8 x 2
    iterations 2.0e-2, 8 x 5 5.6e-3, 16 x 2 1.4e-3, 16 x 4 1.8e-4; 800 Bridge steps of the tiny
    MoE recipe at lr 0.1 (``scripts/compare_optimizers.py``) -- 16 x 4 2.1e-3, 16 x 8 (this
    default) 1.9e-5, 16 x 12 3.4e-6. Cost: ``2 * block * iters`` matrix-vector products, ~0.5%
    of one msign for a 2048 x 6144 matrix."""

    power_iters_cold: int = 50
    """Block power iterations on a module's first step, when no vector is cached (the
    reference runs 100 single-vector iterations from ones on every step; we pay once)."""

    power_block: int = 16
    """Columns of the cached block of right singular vectors (subspace iteration + Rayleigh-Ritz):
    a fresh Gaussian weight's top singular values are nearly equal, and SSO keeps them so, which
    a single vector cannot separate (see ``power_iters`` for the measurement behind 16)."""

    lambda_solver: LambdaSolver = "secant"
    """``secant``: ours, warm-started, fixed budget, no host sync; ``bisect``: the paper's
    bracket-and-bisect reference (host sync per evaluation); ``krylov``: lambda solved on a
    block Krylov space shared by every lambda, then ONE msign and the tangent projection
    (:mod:`megatron_sso.ops.krylov_lambda`; measurements in docs/performance.md)."""

    krylov_blocks: int = 32
    """Cap on the block Krylov steps of ``lambda_solver="krylov"``: ``k = min(ceil(p / 2), cap)``
    for a short side ``p``, so matrices with ``p <= 64`` get the whole space (exact model). Cost
    ``8 k p q`` FLOPs, against ``32 p^2 q + 16 p^3`` for one msign: at most 12.5% of it at
    ``p <= 64``, 1.6% at 512 x 1536, 0.4% at 2048 x 6144 (docs/performance.md has the
    measured accuracy against ``k``)."""

    lambda_tol: float = 2e-4
    """Target ``|h(lambda)|`` of an evaluated msign (paper: 2e-4). The bisect solver stops
    there; the secant solver spends its ``lambda_tol_evals`` / ``lambda_cold_tol_evals``
    further evaluations on the matrices whose best evaluated ``|h|`` is still above it.
    ``max_abs_h`` reports that figure and ``lambda_above_tol`` counts the matrices left above."""

    lambda_max_iter: int = 20
    """Bisection steps of the reference solver (paper: at most 20)."""

    lambda_evals: int = 2
    """msign evaluations per matrix per step of the secant solver once warm (our budget: 2)."""

    lambda_cold_evals: int = 4
    """Secant evaluations on a module's first step, when no root or slope is cached yet.
    The cold slope guess can be 10x off, so 2 evaluations may leave the root unbracketed
    (measured: |h| up to 8e-3 on a 2x64 module); 4 reach the tolerance with a direction
    within cosine 0.999 of the exact one. Over a 200-step run the mean is 2.01 per matrix."""

    lambda_tol_evals: int = 0
    """Further secant evaluations on a warm step, each one changing only the matrices whose best
    evaluated ``|h|`` is still above ``lambda_tol`` (:func:`megatron_sso.ops.solve_lambda_secant`).
    The count is fixed: every one is computed for the whole batch (no host sync) and counted in
    ``msign_calls``. Default 0: on a 60-step byte-level GPT (dim 64, lr 2e-2) the best evaluated
    ``|h|`` of a warm 2-evaluation solve was above 2e-4 for 99.6% of matrix-steps (median 4.6e-2,
    while the interpolated direction's median 1 - cos to a converged solve was 2.9e-6), so a further
    evaluation would be paid on nearly every step, i.e. ``lambda_evals=3``; on warm steps
    ``lambda_tol`` then sets the ``lambda_above_tol`` count."""

    lambda_cold_tol_evals: int = 4
    """The same on a module's first step. A momentum aligned with ``u v^T`` makes ``h`` nearly a
    step function, and the 4 cold evaluations alone left the direction at cosine 0.965 (64 x 64,
    alignment 0.99) or 0.972 (0.9) to the exact one (float64 SVD); with 4 more, 0.99995 and
    1 - 1e-7 (``tests/test_solver_budget.py``). Paid once per module per run."""

    radius_mode: str = "spectral_mup"
    """Sphere radius rule, see :func:`megatron_sso.ops.target_radius` (paper: spectral_mup)."""

    radius_scaler: float = 1.0
    """The ``c`` in ``R = c sqrt(d_out / d_in)`` (paper: 1). In ``hyperball`` mode the Frobenius
    radius is ``c ||W_0||_F``, ``W_0`` the module's weight at its first step (Hyperball paper: 1),
    and ``radius_mode`` is not used."""

    scale_mode: str = "spectral_mup"
    """Update scale rule, see :func:`megatron_sso.ops.update_scale` (paper: sqrt(d_out/d_in))."""

    retract: str = "hard"
    """``hard``: ``W <- (R / sigma) W`` every step; ``dynamic``: multiply by ``1 -+ alpha lr``
    toward the sphere (paper App. A.3)."""

    retract_after_update: bool = True
    """With hard retraction, also retract after the update so the stored weight is on the
    sphere (see :mod:`megatron_sso.optim.sphere_update`, step 6)."""

    retract_alpha: float = 0.1
    """Strength of dynamic retraction; the paper ties it to AdamW's weight decay (0.1)."""

    weight_decay: float = 0.0
    """Decoupled weight decay, applied in ``muon`` mode only: on the sphere modes the
    retraction fixes the norm, so decay would be undone (paper: no decay on sphere matrices)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.msign_coefficients not in COEFFICIENT_SETS:
            raise ValueError(
                f"unknown msign coefficient set {self.msign_coefficients!r}; choose one of {sorted(COEFFICIENT_SETS)}"
            )
        if self.msign_method not in ("standard", "gram"):
            raise ValueError(f"unknown msign_method {self.msign_method!r}; choose 'standard' or 'gram'")
        if self.msign_method == "gram" and self.msign_dtype != "fp32":
            raise ValueError(f"msign_method='gram' computes in fp32; got msign_dtype={self.msign_dtype!r}")
        for name in ("msign_dtype", "power_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        for name in ("msign_steps", "power_iters_cold", "power_block", "lambda_max_iter",
                     "lambda_evals", "lambda_cold_evals", "krylov_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lambda_tol_evals", "lambda_cold_tol_evals"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ValueError(f"power_iters must be a non-negative integer, got {self.power_iters!r}")
        if self.lambda_solver not in ("secant", "bisect", "krylov"):
            raise ValueError(f"unknown lambda_solver {self.lambda_solver!r}; choose 'secant', 'bisect' or 'krylov'")
        if not (self.lambda_tol > 0 and math.isfinite(self.lambda_tol)):
            raise ValueError(f"lambda_tol must be positive, got {self.lambda_tol!r}")
        if self.radius_mode not in ("spectral_mup", "identity"):
            raise ValueError(f"unknown radius_mode {self.radius_mode!r}; choose 'spectral_mup' or 'identity'")
        if not (self.radius_scaler > 0 and math.isfinite(self.radius_scaler)):
            raise ValueError(f"radius_scaler must be positive, got {self.radius_scaler!r}")
        if self.scale_mode not in ("spectral_mup", "shape_scaling", "align_adamw_rms", "identity"):
            raise ValueError(f"unknown scale_mode {self.scale_mode!r}")
        if self.retract not in ("hard", "dynamic"):
            raise ValueError(f"unknown retract mode {self.retract!r}; choose 'hard' or 'dynamic'")
        if not self.retract_alpha >= 0:
            raise ValueError(f"retract_alpha must be >= 0, got {self.retract_alpha!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def msign_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.msign_dtype]

    @property
    def power_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.power_dtype]

    @property
    def on_sphere(self) -> bool:
        """Whether the mode retracts onto the spectral sphere (SSO and MuonSphere)."""
        return self.mode in ("sso", "muon_sphere")

    @property
    def on_hyperball(self) -> bool:
        """Whether the mode retracts onto the Frobenius sphere (Muon-Hyperball)."""
        return self.mode == "hyperball"

