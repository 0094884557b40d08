"""Issue 15 end to end (needs the Megatron stack): every tiny recipe trains at TP=2 through the
CLI, the Megatron-free recipe view agrees with the real config, Bridge's own validate() catches
the rest before launch, and prepare-data's trained / given tokenizers train for real."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.needs import MEGATRON, needs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [needs(*MEGATRON, "tokenizers", "transformers"),
              pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU runs"),
              pytest.mark.megatron]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sso", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ})


def _losses(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"^iter +\d+/\d+ +loss (\S+)", stdout, re.M)]


CASES = [
    ("configs/tiny_dense_cpu.yaml", 2, ["train.micro_batch_size=8"]),  # the command, 3 steps
    ("configs/tiny_moe_cpu.yaml", 2, []),  # sequence parallelism switched on by the CLI
    ("configs/tiny_deepnet_cpu.yaml", 4, ["model.num_query_groups=2"]),  # TP 2 x PP 2 (1 KV group cannot split)
]


@pytest.mark.parametrize("config, nproc, extra", CASES, ids=["dense", "moe", "deepnet"])
def test_tiny_recipes_train_at_tp2(config, nproc, extra):
    proc = _cli("pretrain", "--config", config, "--nproc", str(nproc), "model.tensor_model_parallel_size=2",
                "train.train_iters=3", *extra, "--timeout", "280")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("loading Megatron-Bridge ...\n")
    losses = _losses(proc.stdout)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    errors = [float(e) for e in re.findall(r"\|W\|2/R-1 max (\S+)", proc.stdout)]
    assert len(errors) == 3 and max(errors) < 1e-3, errors  # SSO's weights on their sphere under TP
    assert "pynvml" not in proc.stderr and "Transformer Engine and Apex" not in proc.stderr


def test_plain_view_matches_the_real_config_and_validate_catches_the_rest(tmp_path):
    """The Megatron-free view (PLAIN_DEFAULTS + the recipe) gives the same values as Bridge's
    ConfigContainer for every recipe, and for a recipe that leaves everything at its default; a
    mistake only Megatron knows (fp16 and bf16 together) is one line before launch, after the
    'loading' line."""
    (tmp_path / "minimal.yaml").write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_attention_heads: 8\n")
    code = textwrap.dedent(f"""
        import contextlib, io, json, glob
        from megatron_sso.mcore.cpu import enable_cpu_mode
        enable_cpu_mode()
        from megatron_sso.cli.preflight import PLAIN_DEFAULTS, plain_config
        from megatron_sso.cli.recipe import build_config
        from megatron_sso.cli.main import main
        bad = []
        for path in sorted(glob.glob("configs/*.yaml")) + [{str(tmp_path / "minimal.yaml")!r}]:
            if "bpe" in path:
                continue
            for ov in [(), ("model.tensor_model_parallel_size=2",)]:
                plain, real = plain_config(path, None, ov), build_config(path, None, ov)
                for section, fields in PLAIN_DEFAULTS.items():
                    for f in fields:
                        a, b = getattr(getattr(plain, section), f), getattr(getattr(real, section), f)
                        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
                            bad.append([path, ov, section + "." + f, repr(a), repr(b)])
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(["pretrain", "--config", "configs/tiny_dense_cpu.yaml", "--dry-run", "model.fp16=true",
                       "model.bf16=true"])
        print("RESULT" + json.dumps(dict(bad=bad, rc=rc, stdout=o.getvalue(), stderr=e.getvalue())))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["bad"] == [], out["bad"]
    assert out["rc"] == 2 and out["stdout"] == "loading Megatron-Bridge ...\n", out
    lines = [ln for ln in out["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and "Megatron refuses the config: Only one of self.fp16: True and self.bf16 True" in lines[0]


def _corpus(tmp: Path) -> Path:
    src = tmp / "text"
    (src / "sub").mkdir(parents=True)
    (src / "a.py").write_text("def spectral_sphere(weight, radius):\n    return weight * radius\n" * 40)
    (src / "sub" / "b.txt").write_text("sphère spectrale — ünïcode, the same words again and again\n" * 60)
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    return src


def _read_dataset(prefix: Path) -> list[list[int]]:
    code = (f"from megatron.core.datasets.indexed_dataset import IndexedDataset\n"
            f"ds = IndexedDataset({str(prefix)!r}); print([ds[i].tolist() for i in range(len(ds))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout)


def test_trained_bpe_and_given_tokenizer_train_for_real(tmp_path):
    from tokenizers import Tokenizer

    src = _corpus(tmp_path)
    prefix = tmp_path / "out" / "bpe"
    made = _cli("prepare-data", "--input", str(src), "--output", str(prefix), "--train-tokenizer", "320")
    assert made.returncode == 0, made.stderr[-3000:]
    keys = re.search(r"^recipe keys: (.+)$", made.stdout, re.M).group(1).split()
    assert keys[:2] == ["tokenizer.tokenizer_type=HuggingFaceTokenizer",
                        f"tokenizer.tokenizer_model={prefix.resolve()}.tokenizer"], keys
    tok = Tokenizer.from_file(f"{prefix}.tokenizer/tokenizer.json")
    docs = _read_dataset(prefix)
    texts = [(src / "a.py").read_text(), (src / "sub" / "b.txt").read_text()]
    assert [tok.decode(d[:-1]) for d in docs] == texts and all(d[-1] == 0 for d in docs)
    assert sum(map(len, docs)) < sum(len(t.encode()) for t in texts) / 3  # subwords, not bytes

    # JSON lines through a given tokenizer.json (a directory is written beside the dataset)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    given = tmp_path / "out" / "given"
    made2 = _cli("prepare-data", "--input", str(jsonl), "--output", str(given), "--tokenizer",
                 f"{prefix}.tokenizer/tokenizer.json")
    assert made2.returncode == 0, made2.stderr[-3000:]
    assert _read_dataset(given) == docs and (given.parent / "given.tokenizer" / "tokenizer_config.json").is_file()
    missing = _cli("prepare-data", "--input", str(jsonl), "--output", str(tmp_path / "x"), "--json-key", "body")
    assert missing.returncode == 2 and "docs.jsonl:1: no text under --json-key 'body'" in missing.stderr

    # the printed keys train a recipe on the BPE tokens, offline, in one process
    run = _cli("pretrain", "--config", "configs/tiny_dense_cpu.yaml", "--data-path", str(prefix), *keys,
               "train.train_iters=2", "model.seq_length=32", "dataset.split=100,0,0", "train.global_batch_size=4",
               "train.micro_batch_size=4")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = _losses(run.stdout)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert abs(losses[0] - math.log(tok.get_vocab_size())) < 1.0  # ~ln(vocab) at the start
    assert "Deleting CUDA graphs" not in run.stdout and "pynvml" not in run.stderr
