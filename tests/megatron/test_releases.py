"""The version adapter (``megatron_sso.mcore.compat``) against the installed Megatron's own code,
``SSOOptimizerConfig.provide`` (Megatron-Bridge >= 0.4) and the settings refused because they cut
atomic modules (``mcore/optimizers/unsupported.py``). Runs on both stacks; what it expects of a
release is read from that release's source files, not from the adapter."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.needs import MEGATRON, needs

ROOT = Path(__file__).resolve().parents[2]


def _source(module: str) -> str:
    """A module's source text, found without importing anything (``find_spec`` of a submodule
    would import its parents, and Bridge must not be imported into pytest's process)."""
    top, *rest = module.split(".")
    for location in importlib.util.find_spec(top).submodule_search_locations:
        path = Path(location, *rest).with_suffix(".py")
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(module)


@needs(*MEGATRON)
def test_adapter_answers_match_the_installed_bridge():
    from megatron_sso.mcore.compat import BRIDGE_OPTIMIZER_SITE, bridge_calls_provide, factory_call_sites

    calls_provide = "optimizer_config.provide(" in _source("megatron.bridge.training.optim")
    assert bridge_calls_provide() == calls_provide
    assert (BRIDGE_OPTIMIZER_SITE in factory_call_sites()) == (not calls_provide)
    assert "megatron.training.training" in factory_call_sites()


@needs(*MEGATRON)
def test_absent_module_stubs_match_what_bridge_imports():
    from megatron_sso.mcore.compat import absent_module_stubs

    imports_nvrx = "from nvidia_resiliency_ext.inprocess import" in _source("megatron.bridge.training.pretrain")
    installed = importlib.util.find_spec("nvidia_resiliency_ext") is not None
    names = [name for name, _, _ in absent_module_stubs()]
    assert names == (["nvidia_resiliency_ext", "nvidia_resiliency_ext.inprocess"]
                     if imports_nvrx and not installed else [])


PROVIDE = """
    import json, warnings
    warnings.simplefilter("ignore")
    from megatron_sso.mcore.cpu import enable_cpu_mode
    enable_cpu_mode()
    from megatron_sso.mcore import SSOOptimizerConfig, install, compat
    from megatron_sso.mcore.optimizers import SPECTRA_OPTIMIZERS, SPHERE_OPTIMIZERS
    import megatron.bridge.training.optim as bridge_optim
    out = {"has": {}, "ours": list(SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS) + ["adam+clip"]}
    cases = [(n, {}) for n in SPHERE_OPTIMIZERS + SPECTRA_OPTIMIZERS + ("adam", "sgd", "muon", "dist_muon")]
    for name, extra in cases + [("adam", {"spectra_post_clip": 5.0})]:
        cfg = SSOOptimizerConfig(optimizer=name, lr=1e-3, **extra)
        out["has"][name + ("+clip" if extra else "")] = hasattr(cfg, "provide") and callable(cfg.provide)
    out["patched"] = install()
    out["bridge_wrapped"] = getattr(bridge_optim.get_megatron_optimizer, "_megatron_sso_wrapped", False)
    out["bridge_calls_provide"] = compat.bridge_calls_provide()
    print(json.dumps(out))
"""


@needs(*MEGATRON)
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU mode")
def test_provide_exists_exactly_for_our_optimizers_and_replaces_bridge_wrapping():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROVIDE)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # ours (sphere family, SPECTRA, adam with a clip) have provide(); Bridge's own factory builds
    # plain adam, sgd and Megatron's Muon
    assert {"sso", "adam+clip", "signum"} <= set(out["ours"]) and "adam" not in out["ours"]
    assert out["has"] == {name: name in out["ours"] for name in out["has"]}, out
    # Bridge >= 0.4 builds through provide(): its factory name stays Megatron's own
    assert out["bridge_wrapped"] == (not out["bridge_calls_provide"]), out
    assert ("megatron.bridge.training.optim.get_megatron_optimizer" in out["patched"]) == out["bridge_wrapped"]


def _sso_config(**settings):
    return SimpleNamespace(optimizer="sso", use_distributed_optimizer=False, fp16=False, **settings)


def _chunk(model=None, ddp=None):
    return SimpleNamespace(config=SimpleNamespace(**(model or {})), ddp_config=SimpleNamespace(**(ddp or {})))


REFUSED = [
    ("optimizer", "use_layer_wise_distributed_optimizer", True),
    ("ddp", "use_megatron_fsdp", True),
    ("model", "moe_single_grouped_weight", True),
    ("model", "gtp_weight_remat_size", 2),
    ("model", "expert_gtp_weight_remat_size", 4),
]


@pytest.mark.parametrize("section,name,value", REFUSED)
def test_settings_that_cut_atomic_modules_are_refused_by_the_factory(section, name, value):
    from megatron_sso.mcore.optimizers.factory import get_sphere_megatron_optimizer

    config = _sso_config(**({name: value} if section == "optimizer" else {}))
    chunk = _chunk(model={name: value} if section == "model" else None, ddp={name: value} if section == "ddp" else None)
    with pytest.raises(ValueError) as err:
        get_sphere_megatron_optimizer(config, [chunk])
    message = str(err.value)
    assert f"{section}.{name}={value!r}" in message and "\n" not in message, message


def test_refusal_table_covers_exactly_these_and_off_values_pass():
    from megatron_sso.mcore.optimizers import REFUSALS, find_refusal

    assert sorted((r.section, r.name) for r in REFUSALS) == sorted((s, n) for s, n, _ in REFUSED)
    off = {"optimizer": SimpleNamespace(use_layer_wise_distributed_optimizer=False),
           "model": SimpleNamespace(moe_single_grouped_weight=False, gtp_weight_remat_size=1,
                                    expert_gtp_weight_remat_size=1),
           "ddp": SimpleNamespace(use_megatron_fsdp=False)}
    assert find_refusal("sso", off) is None
    assert find_refusal("sso", {}) is None  # a release without the attributes
    on = {"model": SimpleNamespace(moe_single_grouped_weight=True)}
    assert find_refusal("signum", on).startswith("optimizer='signum' with model.moe_single_grouped_weight=True: ")


FIELDS = """
    import dataclasses, json, warnings
    warnings.simplefilter("ignore")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig
    from megatron_sso.mcore.optimizers import REFUSALS
    classes = {"optimizer": OptimizerConfig, "model": TransformerConfig, "ddp": DistributedDataParallelConfig}
    out = {}
    for r in REFUSALS:
        fields = {f.name: f.default for f in dataclasses.fields(classes[r.section])}
        out[f"{r.section}.{r.name}"] = [r.name in fields, r.name in fields and r.is_on(fields[r.name])]
    print(json.dumps(out))
"""


@needs(*MEGATRON)
def test_refused_names_are_the_installed_megatrons_fields_and_off_by_default():
    """A misspelt name would never refuse anything: every name is a field of its Megatron class
    (those megatron-core 0.17-0.19 added are absent before 0.19), and its default is off."""
    from megatron_sso.mcore.compat import release

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FIELDS)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(on for _, on in out.values()), out
    present = sorted(k for k, (exists, _) in out.items() if exists)
    if release("megatron-core") >= (0, 19):
        assert present == sorted(out), out
    else:
        assert present == ["ddp.use_megatron_fsdp"], out
