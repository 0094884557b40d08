"""megatron-sso: the Spectral Sphere Optimizer (SSO) and its relatives for Megatron.

``SpectralSphere`` works on any PyTorch model; :mod:`megatron_sso.mcore` plugs it into
Megatron-Core's optimizer factory. Layers import one way only:
``ops`` (pure math) -> ``distributed`` (collectives) -> ``optim`` -> ``mcore`` -> ``cli``.
"""

__version__ = "0.1.0"

__all__ = ["SpectralSphere", "SphereConfig", "__version__"]


def __getattr__(name: str):
    """``SpectralSphere`` and ``SphereConfig`` load on first use (PEP 562), so that importing
    the package (``megatron-sso`` starts here) does not import torch: the command line checks
    its input, and installs its warning filters, before the ~2-7 s torch import."""
    if name in ("SpectralSphere", "SphereConfig"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
