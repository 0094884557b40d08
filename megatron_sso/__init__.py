"""megatron-sso: the Spectral Sphere Optimizer (SSO) and its relatives for Megatron.

``SpectralSphere`` works on any PyTorch model; :mod:`megatron_sso.mcore` plugs it into
Megatron-Core's optimizer factory. Layers import one way only:
``ops`` (pure math) -> ``distributed`` (collectives) -> ``optim`` -> ``mcore`` -> ``cli``.
"""

from .optim import SpectralSphere, SphereConfig

__version__ = "0.1.0"

__all__ = ["SpectralSphere", "SphereConfig", "__version__"]
