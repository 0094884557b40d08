"""The launcher's hooks: ``factory.install(sites=...)`` wraps only the sites named (Bridge is never
imported into a Megatron-LM run), and, with the checkout in ``MEGATRON_LM_DIR``, the real
core_v0.16.1 ``parse_args`` / ``get_megatron_optimizer_config`` carry ``signum`` and
``--spectra-*`` through to the config our factory reads.

Each check runs in a fresh interpreter: what it asserts about ``sys.modules`` and the patched
modules is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.megatron_lm.mlm_runs import MLM, ROOT, env, skip_reason
from tests.needs import MEGATRON, needs


def run_child(code: str, *path: str) -> dict:
    """Run ``code`` in a fresh interpreter (``path`` first on ``sys.path``); its last stdout
    line is JSON."""
    base = env()
    child = {**base, "PYTHONPATH": os.pathsep.join([*path, base["PYTHONPATH"]])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=child)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SITES = """
    import json, sys, types
    import megatron_sso.mcore.optimizers.factory as factory

    def get_megatron_optimizer(config, model_chunks, **kw):
        return "stock"

    def get_megatron_muon_optimizer(config, model_chunks, **kw):
        return "stock muon"

    site = types.ModuleType("site_under_test")
    site.get_megatron_optimizer, site.get_megatron_muon_optimizer = get_megatron_optimizer, get_megatron_muon_optimizer
    sys.modules["site_under_test"] = site
    bridge = lambda: sorted(m for m in sys.modules if m.startswith("megatron.bridge"))
    out = {"patched": factory.install(("sso", "muon_sphere", "signum"), sites=("site_under_test",)),
           "again": factory.install(("sso",), sites=("site_under_test",)),
           "bridge_after_sites": bridge(),
           "wrapped": getattr(site.get_megatron_optimizer, "_megatron_sso_original", None) is get_megatron_optimizer,
           "plain_adam": site.get_megatron_optimizer(types.SimpleNamespace(optimizer="adam"), []),
           "muon": site.get_megatron_muon_optimizer(types.SimpleNamespace(optimizer="muon"), [])}
    for bad in (("no_such_site_module",), "site_under_test"):
        try:
            factory.install(("sso",), sites=bad)
            out[repr(bad)] = "no error"
        except (ImportError, ValueError) as exc:
            out[repr(bad)] = type(exc).__name__
    factory.install()  # the default: every call site of compat.factory_call_sites() that imports
    out["bridge_after_default"] = bool(bridge())
    from megatron_sso.mcore import compat
    out["bridge_is_a_site"] = compat.BRIDGE_OPTIMIZER_SITE in compat.factory_call_sites()
    print(json.dumps(out))
"""


@needs(*MEGATRON)
def test_install_wraps_only_the_sites_named_and_never_imports_bridge():
    out = run_child(SITES)
    names = ["site_under_test.get_megatron_optimizer", "site_under_test.get_megatron_muon_optimizer"]
    assert out["patched"] == names and out["again"] == names  # idempotent: wrapped once
    assert out["wrapped"] and out["bridge_after_sites"] == []
    assert (out["plain_adam"], out["muon"]) == ("stock", "stock muon")  # not ours: falls through
    assert out["('no_such_site_module',)"] == "ModuleNotFoundError"  # a named site must import
    assert out["'site_under_test'"] == "ValueError"  # a string is not a tuple of names
    # the default reaches Bridge's call site where Bridge has one (0.3.1); Bridge >= 0.4 calls
    # SSOOptimizerConfig.provide() instead and is then never imported by install()
    assert out["bridge_after_default"] == out["bridge_is_a_site"]


CHECKOUT = """
    import json, sys
    from megatron_sso.mcore.megatron_lm.cpu_mode import enable_megatron_lm_cpu_mode
    enable_megatron_lm_cpu_mode()
    from megatron.training import arguments, initialize, training
    from megatron_sso.mcore.megatron_lm.hooks import install_megatron_lm
    stock_config = training.get_megatron_optimizer_config
    patched = install_megatron_lm()
    out = {"patched": patched, "bridge": sorted(m for m in sys.modules if m.startswith("megatron.bridge"))}
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1", "--lr", "1e-3", "--adam-beta1", "0.8",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--transformer-impl", "local"]
    for name, extra in (("signum", ["--spectra-post-clip", "2", "--spectra-signum-momentum", "0.95"]),
                        ("adam", ["--spectra-post-clip", "1.0"]), ("adam", [])):
        sys.argv = ["pretrain_gpt.py", *base, "--optimizer", name, *extra]
        args = arguments.parse_args()
        initialize.validate_args(args, {})  # as initialize_megatron does (it turns dtype names into dtypes)
        try:
            stock_config(args)
            stock = "ok"
        except ValueError as exc:
            stock = str(exc)
        config, _ = training.get_megatron_optimizer_config(args)
        out[" ".join([name, *extra])] = {
            "stock": stock, "class": type(config).__name__, "optimizer": config.optimizer,
            "beta1": config.adam_beta1, "post_clip": getattr(config, "spectra_post_clip", "absent"),
            "momentum": getattr(config, "spectra_signum_momentum", "absent"),
            "factory_wrapped": getattr(training.get_megatron_optimizer, "_megatron_sso_wrapped", False)}
    print(json.dumps(out))
"""


@pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "checkout present")
def test_real_megatron_lm_parses_signum_and_spectra_flags_into_the_adam_config():
    out = run_child(CHECKOUT, MLM)
    assert out["bridge"] == []
    assert out["patched"] == ["megatron.training.arguments.add_megatron_arguments",
                              "megatron.training.arguments.validate_args",
                              "megatron.training.initialize.validate_args",
                              "megatron.training.training.get_megatron_optimizer_config",
                              "megatron.training.training.get_megatron_optimizer",
                              "megatron.training.training.get_megatron_muon_optimizer"]
    signum = out["signum --spectra-post-clip 2 --spectra-signum-momentum 0.95"]
    assert signum["stock"] == "Invalid optimizer type!"  # why the hook asks for the Adam config
    assert (signum["class"], signum["optimizer"], signum["beta1"], signum["post_clip"], signum["momentum"]) == \
        ("AdamOptimizerConfig", "signum", 0.8, 2.0, 0.95)
    clipped = out["adam --spectra-post-clip 1.0"]
    assert (clipped["stock"], clipped["optimizer"], clipped["post_clip"]) == ("ok", "adam", 1.0)
    plain = out["adam"]
    assert (plain["optimizer"], plain["post_clip"], plain["momentum"]) == ("adam", "absent", "absent")
    assert all(v["factory_wrapped"] for k, v in out.items() if isinstance(v, dict))
