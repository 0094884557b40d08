"""prepare-data's pieces that need no Megatron: the progress bar, the byte-level BPE and local
tokenizer files; and the CLI's exact-message warning filters."""

from __future__ import annotations

import io
import os
import warnings

import pytest

from megatron_sso.cli.progress import Progress
from tests.needs import needs


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_bar_shows_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    bar = Progress("tokenizing", 20_000_000, stream=out, clock=clock, enabled=True)
    clock.t = 0.2
    bar.update(1_000_000)
    assert out.getvalue() == ""  # nothing within the first interval (a small corpus never draws)
    clock.t = 2.0
    bar.update(7_000_000)  # 8 MB in 2 s: 4 MB/s, 12 MB left -> 3 s
    assert out.getvalue() == "\r" + "tokenizing [" + "#" * 9 + "." * 15 + "]  40%  8.0/20.0 MB  4.0 MB/s  ETA 3 s"
    clock.t = 200.0
    bar.update(1_000_000)  # 9 MB in 200 s: 0.045 MB/s, 11 MB left -> 244 s
    assert out.getvalue().endswith("ETA 4:04")
    assert bar.close() == 200.0 and out.getvalue().endswith("\n")
    quiet = io.StringIO()
    silent = Progress("x", 10, stream=quiet, clock=clock, enabled=False)  # not a terminal
    clock.t = 500.0
    silent.update(5)
    silent.close()
    assert quiet.getvalue() == ""


def test_known_noise_is_silenced_by_its_exact_text(monkeypatch):
    from megatron_sso.cli.quiet import KNOWN_NOISE, quiet_known_noise

    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        for text, category, _ in KNOWN_NOISE:
            warnings.warn(text + " (and the rest of the message)", category)
        warnings.warn("The pynvml package is fine", FutureWarning)  # not the known text: shown
        warnings.warn("lr_warmup_steps (160) >= lr_decay_steps (16)", UserWarning)  # useful: shown
    assert [str(w.message) for w in seen] == ["The pynvml package is fine", "lr_warmup_steps (160) >= lr_decay_steps (16)"]
    entries = os.environ["PYTHONWARNINGS"].split(",")
    assert entries[0] == "error::DeprecationWarning"  # the user's own setting stays first
    assert "ignore:The pynvml package is deprecated:FutureWarning" in entries
    quiet_known_noise()
    assert os.environ["PYTHONWARNINGS"].split(",") == entries  # idempotent (tests call main() repeatedly)


@needs("tokenizers", "transformers")
def test_trained_bpe_round_trips_and_saves_a_loadable_directory(tmp_path):
    from megatron_sso.cli import tokenizer_files as tf

    texts = ["def spectral_sphere(weight, radius):\n    return weight * radius\n" * 20,
             "Sphère spectrale — ünïcode et ∑ symboles\n" * 20]
    tok = tf.train_bpe(iter(texts), 400)
    assert 258 <= tok.get_vocab_size() <= 400 and tok.token_to_id(tf.BPE_EOD) == 0
    for text in texts + ["never seen: \u00e6\u00f8\u00e5 \U0001F600 tabs\tand\x01controls"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text  # byte-level: every string encodes, no unknown token
    assert len(tok.encode(texts[0]).ids) < len(texts[0].encode()) / 3  # merges were learned
    tf.save_dir(tok, tmp_path / "bpe", tf.BPE_EOD)
    assert tf.vocab_size(tmp_path / "bpe") == tok.get_vocab_size()
    assert tf.eod_token(tmp_path / "bpe", tf.load(tmp_path / "bpe")) == (tf.BPE_EOD, 0)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))  # what Bridge's HuggingFaceTokenizer calls
    assert len(hf) == tok.get_vocab_size() and hf.eos_token_id == 0
    with pytest.raises(tf.TokenizerFileError, match="no tokenizer.json"):
        tf.load(tmp_path)
    assert tf.looks_local("data/x.tokenizer") and tf.looks_local("./tok") and not tf.looks_local("Qwen/Qwen3-1.7B")
