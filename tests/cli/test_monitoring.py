"""The training monitor's router MaxVio and its recipe key.

* ``max_violation`` against the definition computed by hand, and its bounds (0 balanced,
  ``E / k - 1`` when k experts take every token);
* ``RouterHooks`` on Megatron's real ``TopKRouter`` (in a subprocess with CPU mode, which must not
  run in pytest's process): its per-expert counts equal an independent top-k of the router's
  logits over two micro-batches, nothing is counted when inactive or in eval mode;
* the recipe's ``monitor:`` section and ``monitor.*`` overrides: defaults, precedence, errors
  naming the bad key, and ``pretrain --dry-run`` printing it (a real CLI run, no Megatron training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sso.cli.recipe import RecipeError, monitor_settings
from megatron_sso.mcore.observe.monitoring import ENV_PATH, ENV_ROUTER, max_violation, monitor_environment
from tests.needs import MEGATRON, needs

ROOT = Path(__file__).resolve().parents[2]


def test_max_violation_matches_definition_and_bounds():
    loads = [12, 11, 8, 21, 12, 20]
    mean = sum(loads) / len(loads)
    assert max_violation(torch.tensor(loads)) == pytest.approx((max(loads) - mean) / mean)
    assert max_violation(torch.full((8,), 5)) == 0.0
    e, k, tokens = 8, 2, 100  # every token on the same 2 experts: the largest possible violation
    assert max_violation(torch.tensor([tokens] * k + [0] * (e - k))) == pytest.approx(e / k - 1)
    assert max_violation(torch.zeros(4)) != max_violation(torch.zeros(4))  # NaN: nothing routed


ROUTER_SCRIPT = r"""
import json
from types import SimpleNamespace
import torch
from megatron_sso.mcore.cpu.mode import enable_cpu_mode
enable_cpu_mode()
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.moe.router import TopKRouter
from megatron_sso.mcore.observe.monitoring import RouterHooks
E, K, H = 6, 2, 16
cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, num_moe_experts=E, moe_router_topk=K,
                        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
                        use_cpu_initialization=True, moe_router_dtype="fp32")
torch.manual_seed(0)
model = torch.nn.Module()
model.decoder = torch.nn.Module()
model.decoder.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
model.decoder.layers[1].mlp = torch.nn.Module()
router = TopKRouter(cfg, pg_collection=SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None))
model.decoder.layers[1].mlp.router = router
hooks = RouterHooks([model])
xs = [torch.randn(7, 3, H) for _ in range(2)]
router(xs[0])                      # inactive: not counted
hooks.active = True
model.train()
for x in xs:
    router(x)
model.eval()
router(torch.randn(5, 3, H))       # evaluation forward: not counted
counts = hooks.acc["1"].tolist()
ref = sum(torch.bincount((x.reshape(-1, H) @ router.weight.detach().T).topk(K, dim=-1).indices.flatten(),
                         minlength=E) for x in xs).tolist()
print("RESULT " + json.dumps({"counts": counts, "ref": ref, "read": hooks.read(), "after": hooks.acc}))
"""


@needs(*MEGATRON)
@pytest.mark.megatron
def test_router_hooks_count_real_topk_router():
    proc = subprocess.run([sys.executable, "-c", ROUTER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["counts"] == res["ref"] and sum(res["ref"]) == 2 * 2 * 21  # 2 micro-batches x 21 tokens x top-2
    mean = sum(res["ref"]) / len(res["ref"])
    assert res["read"] == {"maxvio/1": pytest.approx((max(res["ref"]) - mean) / mean)}
    assert res["after"] == {}  # read() resets


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_monitor_section_defaults_and_overrides(tmp_path):
    assert monitor_settings(_recipe(tmp_path, "train: {train_iters: 5}\n")) is None  # off by default
    p = _recipe(tmp_path, "monitor:\n  path: m.jsonl\n  interval: 5\n")
    assert monitor_settings(p) == {"path": "m.jsonl", "interval": 5, "activations": True, "router": True}
    got = monitor_settings(p, ("monitor.interval=2", "monitor.router=false", "train.train_iters=3"))
    assert got == {"path": "m.jsonl", "interval": 2, "activations": True, "router": False}
    assert monitor_settings(p, ("monitor.path=null",)) is None  # an override switches it off
    env = monitor_environment(**got)
    assert env[ENV_PATH] == "m.jsonl" and env[ENV_ROUTER] == "0"


@pytest.mark.parametrize("text, overrides, needle", [
    ("monitor: {path: m.jsonl, intervall: 5}\n", (), "unknown key 'monitor.intervall'"),
    ("monitor: {path: m.jsonl}\n", ("monitor.interval=0",), "monitor.interval: expected steps between"),
    ("monitor: {path: m.jsonl, activations: maybe}\n", (), "monitor.activations: expected true/false"),
    ("monitor: m.jsonl\n", (), "'monitor' must be a mapping"),
])
def test_monitor_errors_name_the_key(tmp_path, text, overrides, needle):
    p = _recipe(tmp_path, text)
    with pytest.raises(RecipeError, match=needle.replace("(", r"\(")) as info:
        monitor_settings(p, overrides)
    source = f"override '{overrides[0]}'" if overrides else str(p)
    assert str(info.value).startswith(source)


@needs(*MEGATRON)
@pytest.mark.megatron
def test_pretrain_dry_run_reports_and_rejects_monitor_keys(tmp_path):
    run = [sys.executable, "-m", "megatron_sso", "pretrain", "--config", "configs/tiny_moe_cpu.yaml", "--dry-run"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run(run + ["monitor.path=x.jsonl", "monitor.interval=3"], cwd=ROOT, capture_output=True,
                        text=True, timeout=240, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "monitor: path=x.jsonl interval=3 activations=True router=True" in ok.stdout
    bad = subprocess.run(run + ["monitor.pth=x.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert bad.returncode == 2 and "unknown key 'monitor.pth'" in bad.stderr, bad.stderr[-2000:]


@needs(*MEGATRON)
@pytest.mark.megatron
@pytest.mark.distributed
def test_maxvio_is_the_global_batchs_under_data_parallel(tmp_path):
    # The same global batch through 1 rank and through 2 data-parallel ranks (4 sequences each):
    # the router loads are all-reduced, so MaxVio must be the single process's, not one rank's half.
    data = tmp_path / "src"
    subprocess.run([sys.executable, "-m", "megatron_sso", "prepare-data", "--input", str(ROOT / "megatron_sso"),
                    "--include", "*.py", "--output", str(data)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    got = {}
    for nproc in (1, 2):
        log = tmp_path / f"m{nproc}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "megatron_sso", "pretrain",
                               "--config", "configs/tiny_moe_cpu.yaml",
                               "--nproc", str(nproc), "--data-path", str(data),  # no --timeout: none by default
                               "train.train_iters=2", "train.micro_batch_size=4", f"monitor.path={log}",
                               "monitor.interval=1", "monitor.activations=false"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        got[nproc] = {r["step"]: {k: v for k, v in r.items() if k.startswith("maxvio/")} for r in recs
                      if r["kind"] == "train"}
    # tiny_moe_cpu.yaml has moe_layer_freq [0, 1]: layer 0 is dense (no router), layer 1 MoE
    assert set(got[1][1]) == {"maxvio/1"}, got
    assert got[1][1] and got[1][1] == got[2][1], got  # step 1: initial weights, identical integer loads
    assert got[2][2] == pytest.approx(got[1][2], abs=0.05), got  # step 2: summation-order noise may move a tie
