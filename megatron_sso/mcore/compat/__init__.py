"""The differences between the Megatron releases we support, answered in one place.

:mod:`.releases` reads the installed megatron-core / Megatron-Bridge versions (metadata only, no
Megatron import) and says which call sites to wrap, whether Bridge calls ``provide()``, and which
absent modules a release imports anyway. The lowest room: it imports no other room, and every
other room may use it. See docs/megatron.md, "Megatron releases".
"""

from .. import lazy_face

FACE = {
    "releases": ("release", "bridge_calls_provide", "factory_call_sites", "absent_module_stubs",
                 "builtin_gpt_unavailable", "BRIDGE_OPTIMIZER_SITE", "MEGATRON_LM_OPTIMIZER_SITE"),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
