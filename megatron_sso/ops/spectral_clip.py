"""SPECTRA spectral clipping: the pure tensor math (imports torch only).

SPECTRA (Jiang, Semenov & Stich, arXiv 2603.14315, ICML 2026; SPEC §5) replaces the update
``U`` of a base optimiser (AdamW, Signum, AdEMAMix, ...) of every 2-D weight by a spectrally
clipped version before it is applied ("post-clipping", released defaults ``c = 5`` with a
cosine schedule, ``c = 10`` with WSD), and optionally clips raw 2-D gradients with
``c = 0.1`` before global-norm clipping ("pre-clipping"). Two clips are provided:

* :func:`hard_spectral_clip` -- every singular value ``sigma`` becomes ``min(sigma, c)``
  (thin SVD; :mod:`.spectral_clip_hard`);
* :func:`soft_spectral_clip` -- ``sigma -> sigma / sqrt(1 + sigma^2 / c^2)``, i.e.
  ``H_c(X) = (I + X X^T / c^2)^(-1/2) X = X (I + X^T X / c^2)^(-1/2)``, computed without an
  SVD by a Newton-Schulz iteration on the small Gram side, also on a tensor-parallel shard
  with one Gram all-reduce (:mod:`.spectral_clip_soft`; the algorithm, its precision floor
  and measured accuracy are documented there). Its per-step polynomial tables and their
  Remez design live in :mod:`.spectral_clip_coefficients`.

Units: ``c`` is a singular value, so it is in the units of ``X`` itself (an update, a
gradient); both clips return a tensor of ``X``'s shape, dtype and units whose singular vectors
are those of ``X``. The SPECTRA update multiplier is :func:`spectra_update_scale`.

This module is the public face of the four files; import from here (or from
:mod:`megatron_sso.ops`).
"""

from __future__ import annotations

from .spectral_clip_checks import AllReduce
from .spectral_clip_coefficients import (
    DEFAULT_SOFT_CLIP_STEPS,
    SOFT_CLIP_COEFFICIENTS,
    SOFT_CLIP_DESIGN,
    design_soft_clip_coefficients,
)
from .spectral_clip_hard import hard_spectral_clip, spectra_update_scale
from .spectral_clip_soft import soft_spectral_clip

__all__ = [
    "AllReduce",
    "DEFAULT_SOFT_CLIP_STEPS",
    "SOFT_CLIP_COEFFICIENTS",
    "SOFT_CLIP_DESIGN",
    "design_soft_clip_coefficients",
    "hard_spectral_clip",
    "soft_spectral_clip",
    "spectra_update_scale",
]
