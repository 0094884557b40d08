"""Optimizers: the sphere family (SSO, MuonSphere, Muon), SPECTRA and its base optimizers."""

from .ademamix import AdEMAMix, AdEMAMixConfig
from .config import SphereConfig
from .distributed_sphere import DistributedSpectralSphere
from .signum import Signum, SignumConfig
from .spectra import (
    BASE_OPTIMIZERS,
    DEFAULT_CLIP_C,
    DEFAULT_PRE_CLIP_C,
    AdamWConfig,
    Spectra,
    SpectraConfig,
    pre_clip_gradients_,
    spectra_clip_update,
    spectra_param_groups,
)
from .spectral_sphere import SpectralSphere
from .sphere_update import BatchStats, ShardHooks, SphereBuffers, sphere_update_

__all__ = [
    "BASE_OPTIMIZERS", "DEFAULT_CLIP_C", "DEFAULT_PRE_CLIP_C", "AdEMAMix", "AdEMAMixConfig",
    "AdamWConfig", "BatchStats", "DistributedSpectralSphere", "ShardHooks", "Signum", "SignumConfig", "Spectra",
    "SpectraConfig", "SpectralSphere", "SphereBuffers", "SphereConfig", "pre_clip_gradients_",
    "spectra_clip_update", "spectra_param_groups", "sphere_update_",
]
