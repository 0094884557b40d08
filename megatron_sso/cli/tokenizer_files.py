"""Hugging Face tokenizers on local disk: which names are paths, their size, their end-of-document
token, and a byte-level BPE trained on a corpus. Only the ``tokenizers`` library (Rust, imports
in ~0.2 s) is used to read; writing a directory that ``AutoTokenizer`` loads needs ``transformers``.

A recipe's ``tokenizer.tokenizer_model`` is a Hub id (``Qwen/Qwen3-1.7B``) or a local directory;
Hugging Face tells them apart by whether the path exists. We do the same, and additionally treat
a name that can only be a path (absolute, ``./``, ``~``, two or more ``/``, a ``.json`` or
``.tokenizer`` ending) as local, so that a missing local tokenizer is reported before launch
rather than as a failed download inside a rank.
"""

from __future__ import annotations

import json
from pathlib import Path

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-document tokens looked for when a tokenizer names no ``eos_token`` (GPT-2/Qwen,
Llama-2/T5, Llama-3, Gemma spellings)."""

BPE_EOD = "<|endoftext|>"
"""The one special token of a BPE trained by :func:`train_bpe` (id 0), its end of document."""


class TokenizerFileError(ValueError):
    """A local tokenizer that is missing or unreadable; one line for the user."""


def looks_local(name: str) -> bool:
    """True when ``name`` exists, or can only be a path (never a Hub id ``org/name``)."""
    s = str(name)
    return (Path(s).expanduser().exists() or s.startswith(("/", "./", "../", "~")) or s.count("/") >= 2
            or s.endswith((".json", ".tokenizer")))


def tokenizer_json(path: str | Path) -> Path:
    """The ``tokenizer.json`` of a directory, or ``path`` itself when it is that file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerFileError(f"{path}: no tokenizer.json (a Hugging Face tokenizer directory or its "
                                 "tokenizer.json file is expected)")
    return p


def load(path: str | Path):
    """The ``tokenizers.Tokenizer`` saved at ``path`` (directory or tokenizer.json)."""
    from tokenizers import Tokenizer

    file = tokenizer_json(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
        raise TokenizerFileError(f"{file}: not a tokenizer file ({str(exc).splitlines()[0][:120]})") from None


def vocab_size(path: str | Path) -> int:
    """``len(AutoTokenizer.from_pretrained(path))``: the vocabulary with added tokens."""
    return int(load(path).get_vocab_size(with_added_tokens=True))


def eod_token(path: str | Path, tok) -> tuple[str, int]:
    """The end-of-document token and id: the ``eos_token`` of ``tokenizer_config.json`` (what
    Megatron's Hugging Face wrapper uses as ``eod``), else the first of :data:`EOD_CANDIDATES`
    in the vocabulary."""
    p = Path(path).expanduser()
    config = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
    names: list[str] = []
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos:
            names.append(eos)
    for name in names + list(EOD_CANDIDATES):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return name, int(token_id)
    raise TokenizerFileError(f"{path}: no end-of-document token (no eos_token in tokenizer_config.json and none "
                             f"of {', '.join(EOD_CANDIDATES)} in the vocabulary)")


def train_bpe(texts, vocab: int, length: int | None = None):
    """A byte-level BPE of ``vocab`` tokens trained on the strings ``texts`` (offline, the
    ``tokenizers`` library): the 256 byte symbols (so every text encodes, no unknown token),
    :data:`BPE_EOD`, then merges by frequency. A small corpus may stop short of ``vocab``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab < 257 + 1:
        raise TokenizerFileError(f"--train-tokenizer {vocab}: needs more than 257 tokens (256 bytes + end of "
                                 "document) to learn any merge")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BPE_EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_dir(tok, directory: str | Path, eod: str) -> None:
    """Write ``tok`` as a directory ``AutoTokenizer.from_pretrained`` (and so Bridge's
    ``HuggingFaceTokenizer``) loads offline, with ``eod`` as its ``eos_token``."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod).save_pretrained(str(directory))
