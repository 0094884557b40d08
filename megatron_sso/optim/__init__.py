"""Sphere-family optimizers: the functional core and the ``torch.optim`` class."""

from .config import SphereConfig
from .spectral_sphere import SpectralSphere
from .sphere_update import BatchStats, ShardHooks, SphereBuffers, sphere_update_

__all__ = ["BatchStats", "ShardHooks", "SpectralSphere", "SphereBuffers", "SphereConfig", "sphere_update_"]
