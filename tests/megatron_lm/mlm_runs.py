"""Shared by the Megatron-LM tests: the checkout in ``MEGATRON_LM_DIR``, a tiny GPT's arguments,
launching through ``torchrun``, and reading a saved ``torch`` checkpoint back.

The check that a sphere optimizer really ran with the flags given: every atomic module of the
saved weights (each Q, K, V head, proj, fc1, fc2) has spectral norm ``c sqrt(d_out / d_in)``,
``c`` being ``--sso-radius-scaler``; Megatron's init (std 0.02) is far from that, and Adam
would not keep it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from megatron_sso.mcore.bridge.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
MLM = os.environ.get("MEGATRON_LM_DIR", "").strip()
LAYERS, HIDDEN, HEADS, SEQ = 2, 64, 4, 32


def skip_reason() -> str:
    if not MLM:
        return "MEGATRON_LM_DIR is not set (a Megatron-LM checkout at tag core_v0.16.1, docs/megatron.md)"
    root = Path(MLM)
    if not (root / "pretrain_gpt.py").is_file():
        return f"MEGATRON_LM_DIR={MLM} has no pretrain_gpt.py"
    built = list((root / "megatron/core/datasets").glob("helpers_cpp*"))
    if not built and importlib.util.find_spec("pybind11") is None:
        return (f"the dataset helpers of MEGATRON_LM_DIR={MLM} are not built and pybind11 is missing: "
                "make -C $MEGATRON_LM_DIR/megatron/core/datasets")
    return ""


TINY = (f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} --seq-length {SEQ} "
        f"--max-position-embeddings {SEQ} --micro-batch-size 2 --train-iters 3 --lr 1e-3 --min-lr 1e-4 "
        "--lr-decay-style cosine --mock-data --tokenizer-type NullTokenizer --vocab-size 127 --split 1,0,0 "
        "--eval-iters 0 --eval-interval 1000 --transformer-impl local --distributed-backend gloo "
        "--use-cpu-initialization --no-gradient-accumulation-fusion --no-masked-softmax-fusion "
        "--no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --log-interval 1 "
        "--seed 1234 --ckpt-format torch --save-interval 3").split()


def env(checkout: str = MLM) -> dict:
    """The children's environment: the checkout (``""``: none, so the launcher runs its built-in
    script), this repository importable, quiet warnings; TP > 1 needs CUDA_DEVICE_MAX_CONNECTIONS=1
    (Megatron-LM's validate_args)."""
    return {**os.environ, "MEGATRON_LM_DIR": checkout, "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def launch(nproc: int, *extra: str, entry: tuple[str, ...] = ("-m", "megatron_sso.megatron_lm"),
           timeout: float = 400, checkout: str = MLM, base: tuple[str, ...] = tuple(TINY)) -> subprocess.CompletedProcess:
    """``torchrun`` ``nproc`` local ranks of ``entry`` (the launcher by default) on the tiny GPT
    (``base``: :data:`TINY`); ``extra`` arguments come last, so they override ``base``'s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *entry, *base,
           f"--global-batch-size={2 * nproc}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(checkout))


SPECTRAL = textwrap.dedent("""
    import json, sys, torch
    sd = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
    m, args, hd = sd["model"], sd["args"], {hd}
    out = {{"lambda_tol": args.sso_lambda_tol, "radius_scaler": args.sso_radius_scaler,
           "optimizer": args.optimizer, "iteration": sd["iteration"], "ratios": {{}}}}
    def ratio(name, w):  # sigma / (c sqrt(d_out / d_in)), c = the radius scaler the run was given
        out["ratios"][name] = (torch.linalg.matrix_norm(w.double(), ord=2)
                               / (args.sso_radius_scaler * (w.shape[0] / w.shape[1]) ** 0.5)).item()
    for layer in range({layers}):
        p = f"decoder.layers.{{layer}}."
        qkv = m[p + "self_attention.linear_qkv.weight"]  # per query group: [q heads, k, v], hd rows each
        for i in range(qkv.shape[0] // hd):
            ratio(f"{{p}}qkv.{{i}}", qkv[i * hd:(i + 1) * hd])
        for name in ("self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
            ratio(p + name, m[p + name])
    ratio("embedding", m["embedding.word_embeddings.weight"])
    print(json.dumps(out))
""").format(hd=HIDDEN // HEADS, layers=LAYERS)


def spectral_report(save: Path, iteration: int = 3) -> dict:
    """What the run saved at ``iteration``: its sso_* arguments and sigma / R of every atomic
    module (and of the word embedding, which AdamW trains) by float64 SVD, read in a child
    process (unpickling imports Megatron)."""
    ckpt = save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    base = env()
    child = {**base, "PYTHONPATH": os.pathsep.join(p for p in (MLM, base["PYTHONPATH"]) if p)}  # args unpickle Megatron types
    proc = subprocess.run([sys.executable, "-c", SPECTRAL, str(ckpt)], capture_output=True, text=True,
                          timeout=180, env=child)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MATRICES = 4 * LAYERS  # linear_qkv, linear_proj, linear_fc1, linear_fc2 per layer
MODULES = LAYERS * (HEADS + 2 * HEADS + 3)  # q, k, v per head (no GQA), proj, fc1, fc2


def losses(log: str, iters: int = 3) -> list[float]:
    """The ``lm loss`` Megatron-LM logged at each of the ``iters`` iterations."""
    return [float(x) for x in re.findall(rf"iteration\s+\d+/\s*{iters} \|.*?lm loss: ([0-9.Ee+-]+)", log)]


def finished_log(proc: subprocess.CompletedProcess, iters: int = 3) -> str:
    """The run's output, after checking that it exited 0 and logged ``iters`` iterations with
    finite losses in a plausible range (ln 127 = 4.8 at the start)."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    found = losses(log, iters)
    assert len(found) == iters and all(0 < x < 10 for x in found), found
    return log


def check_run(proc: subprocess.CompletedProcess, optimizer: str, nproc: int, iters: int = 3) -> str:
    """The run finished ``iters`` iterations with finite losses and every rank built our
    optimizer on the expected parameters and atomic modules; returns the log."""
    log = finished_log(proc, iters)
    built = re.findall(rf"megatron_sso: {optimizer} on (\d+) parameters \((\d+) atomic modules\)", log)
    assert built == [(str(MATRICES), str(MODULES))] * nproc, built
    return log


SPECTRA_BUILT = (r"megatron_sso: (\w+) with SPECTRA \(clip (\w+) c=([0-9.]+), pre-clip (\w+)\) on (\d+) "
                 r"parameters \((\d+) atomic modules\), Adam on (\d+) parameters")
"""What the SPECTRA builder logs on each rank: optimizer, clip, c, pre-clip, clipped parameters,
atomic modules, parameters left to Megatron's Adam."""

OTHER = 2 + LAYERS * 8 + 2
"""Parameters left to Megatron's Adam in the tiny GPT: word and position embeddings (the output
layer shares the word embedding), per layer the 8 vectors (2 norms x weight and bias, 4 linear
biases), and the final norm's weight and bias."""


def check_spectra_built(log: str, optimizer: str, c: float, nproc: int = 1) -> None:
    """Every rank built SPECTRA (soft clip at ``c``, no pre-clip) on the tiny GPT's matrices."""
    built = re.findall(SPECTRA_BUILT, log)
    assert built == [(optimizer, "soft", str(c), "off", str(MATRICES), str(MODULES), str(OTHER))] * nproc, built


def assert_on_sphere(report: dict, tol: float = 1e-3) -> None:
    """Every atomic module sits on its sphere; the AdamW-trained embedding does not."""
    ratios = dict(report["ratios"])
    embedding = ratios.pop("embedding")
    assert len(ratios) == LAYERS * (3 * HEADS + 3), sorted(ratios)
    bad = {k: v for k, v in ratios.items() if abs(v - 1) > tol}
    assert not bad, bad
    assert abs(embedding - 1) > 0.1, embedding


def doc_cluster_args() -> list[str]:
    """The Megatron-LM arguments of the 1.7B launcher command in docs/megatron.md, placeholders
    filled (so a test can check that Megatron-LM's parser accepts them)."""
    text = (ROOT / "docs" / "megatron.md").read_text()
    block = text.split("torchrun --nproc_per_node 8 -m megatron_sso.megatron_lm")[1].split("```")[0]
    block = block.replace("\\\n", " ").replace("<prefix>", "/nonexistent/corpus")
    block = block.replace("--tokenizer-type <type> <tokenizer args>", "--tokenizer-type NullTokenizer --vocab-size 1000")
    assert "<" not in block, block
    return block.split()

