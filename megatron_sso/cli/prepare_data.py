"""``megatron-sso prepare-data``: text files or JSON lines -> a Megatron indexed dataset.

Three tokenizers:

* bytes (the default): ids 0-255 are the UTF-8 bytes, 256 ends a document. It needs no
  download and no training, round-trips exactly, and Bridge reads it with its own
  ``NullTokenizer`` of ``vocab_size: 257`` (whose end-of-document id is ``vocab_size - 1``);
* ``--tokenizer PATH``: a local Hugging Face tokenizer (a directory, or its ``tokenizer.json``);
  documents end with its ``eos_token`` (what Megatron's Hugging Face wrapper calls ``eod``);
* ``--train-tokenizer N``: a byte-level BPE of N tokens trained on the corpus itself with the
  ``tokenizers`` library, offline, saved beside the dataset as ``PREFIX.tokenizer/`` (a
  directory ``AutoTokenizer`` and so Bridge's ``HuggingFaceTokenizer`` load offline).

Input: a folder (searched recursively) or one file. A plain file is one document; a
``.jsonl`` / ``.json`` file holds one JSON object per line whose ``--json-key`` (default
``text``) is one document, as in Megatron-LM's ``tools/preprocess_data.py``. On a terminal a
progress bar shows bytes/s and the time left. The last lines printed are the exact recipe keys
that train on the result. The ``.bin``/``.idx`` pair (and the tokenizer directory) are written
by megatron-core's ``IndexedDatasetBuilder`` under temporary names and renamed into place only
when complete, so an interrupted run never leaves a half-written dataset that training would accept.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import tokenizer_files
from .progress import Progress

EOD = 256
VOCAB_SIZE = 257


class DataError(ValueError):
    """Bad input for prepare-data; the message is one line for the user."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of text files (searched recursively) or one file; "
                                                  "*.jsonl / *.json files hold one JSON document per line")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--include", action="append", default=None,
                   help="file-name pattern to include (repeatable; default: every text file)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    p.add_argument("--json-key", default="text", help="key of the document text in JSON lines (default: text)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="a local Hugging Face tokenizer directory or tokenizer.json (default: bytes)")
    group.add_argument("--train-tokenizer", type=int, default=None, metavar="N",
                       help="train a byte-level BPE of N tokens on the corpus (offline), saved as PREFIX.tokenizer/")


JSON_SUFFIXES = (".jsonl", ".json")
"""Files read as JSON lines (one document per line), like Megatron-LM's preprocess_data input."""


def text_files(root: Path, include: list[str] | None) -> list[Path]:
    """Sorted (deterministic) regular files under ``root`` matching ``include``; ``root``
    itself when it is a file."""
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if include and not any(fnmatch.fnmatch(name, pat) for pat in include):
                continue
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                files.append(path)
    return files


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Corpus:
    """The documents of ``files`` (UTF-8 bytes), read lazily, each time :meth:`documents` is
    iterated (a trained tokenizer reads the corpus twice), up to ``max_bytes`` of text."""

    files: list[Path]
    json_key: str = "text"
    max_bytes: Optional[int] = None
    skipped: int = 0
    text_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        size = sum(f.stat().st_size for f in self.files)
        return min(size, self.max_bytes) if self.max_bytes else size

    def _file_documents(self, path: Path) -> Iterator[tuple[bytes, int]]:
        """(document, bytes of input it used) for one file; non-text files are skipped."""
        try:
            data = path.read_bytes()
        except OSError:
            self.skipped += 1
            return
        if path.suffix.lower() not in JSON_SUFFIXES:
            if data and _is_text(data):
                yield data, len(data)
            else:
                self.skipped += 1
            return
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc})") from None
            text = record.get(self.json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{number}: no text under --json-key {self.json_key!r} (keys: {keys})")
            if text:
                yield text.encode("utf-8"), len(line)

    def documents(self, progress: Optional[Progress] = None) -> Iterator[bytes]:
        """The documents in order; ``skipped`` and ``text_bytes`` count this pass."""
        self.skipped = self.text_bytes = 0
        for path in self.files:
            for doc, used in self._file_documents(path):
                if self.max_bytes is not None and self.text_bytes + len(doc) > self.max_bytes:
                    doc = doc[: self.max_bytes - self.text_bytes]
                self.text_bytes += len(doc)
                if progress is not None:
                    progress.update(min(used, len(doc)) if self.max_bytes else used)
                if doc:
                    yield doc
                if self.max_bytes is not None and self.text_bytes >= self.max_bytes:
                    return


def _texts(corpus: Corpus, progress: Optional[Progress]) -> Iterator[str]:
    for doc in corpus.documents(progress):
        yield doc.decode("utf-8", errors="ignore")  # a --max-bytes cut may split a character


@dataclass(frozen=True)
class TokenizerChoice:
    """How documents become ids: ``encode`` (None: bytes), the end-of-document id, the vocabulary
    size, and for a Hugging Face tokenizer the directory a recipe names."""

    kind: str
    eod: int
    vocab_size: int
    tokenizer: object = None
    directory: Optional[Path] = None


def _choose_tokenizer(args_tokenizer: Optional[str], train: Optional[int], corpus: Corpus, prefix: Path,
                      tmp: Path) -> TokenizerChoice:
    """Bytes, a given tokenizer, or one trained on ``corpus``. A tokenizer the recipe cannot load
    as it is (a bare tokenizer.json, a trained one) is written to ``tmp.tokenizer``, which
    :func:`prepare` renames to ``PREFIX.tokenizer`` with the dataset."""
    if args_tokenizer is None and train is None:
        return TokenizerChoice("bytes", EOD, VOCAB_SIZE)
    try:
        if train is not None:
            progress = Progress("training BPE", corpus.total_bytes)
            tok = tokenizer_files.train_bpe(_texts(corpus, progress), train)
            progress.close()
            eod_name, eod = tokenizer_files.BPE_EOD, tok.token_to_id(tokenizer_files.BPE_EOD)
        else:
            if not Path(args_tokenizer).expanduser().exists():
                raise DataError(f"--tokenizer {args_tokenizer!r} not found (a local Hugging Face tokenizer "
                                "directory or tokenizer.json)")
            tok = tokenizer_files.load(args_tokenizer)
            eod_name, eod = tokenizer_files.eod_token(args_tokenizer, tok)
            given = Path(args_tokenizer).expanduser().resolve()
            if given.is_dir() and (given / "tokenizer_config.json").is_file():
                return TokenizerChoice("huggingface", eod, tok.get_vocab_size(with_added_tokens=True), tok, given)
        out = Path(f"{tmp}.tokenizer")
        tokenizer_files.save_dir(tok, out, eod_name)
    except tokenizer_files.TokenizerFileError as exc:
        raise DataError(str(exc)) from None
    return TokenizerChoice("huggingface", int(eod), tok.get_vocab_size(with_added_tokens=True), tok,
                           Path(f"{prefix}.tokenizer").resolve())


def _encoded(corpus: Corpus, choice: TokenizerChoice, progress: Progress, batch: int = 256):
    """Token ids per document (int64 numpy arrays), end-of-document appended; a Hugging Face
    tokenizer encodes ``batch`` documents per call (its Rust side runs them in parallel)."""
    import numpy as np

    if choice.tokenizer is None:
        for doc in corpus.documents(progress):
            yield np.append(np.frombuffer(doc, dtype=np.uint8).astype(np.int64), choice.eod)
        return
    pending: list[str] = []

    def flush():
        for enc in choice.tokenizer.encode_batch(pending, add_special_tokens=False):
            yield np.array(enc.ids + [choice.eod], dtype=np.int64)

    for text in _texts(corpus, progress):
        pending.append(text)
        if len(pending) == batch:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def prepare(input_dir: str | Path, output_prefix: str | Path, include: list[str] | None = None,
            max_bytes: int | None = None, json_key: str = "text", tokenizer: str | None = None,
            train_tokenizer: int | None = None) -> dict:
    """Write the dataset; returns the metadata also written to ``PREFIX.json``: ``documents``,
    ``tokens``, ``bytes``, ``skipped_files``, ``tokenizer`` (``bytes`` or ``huggingface``),
    ``tokenizer_path``, ``vocab_size``, ``eod``, ``seconds``. Files that are not UTF-8 text (or
    contain NUL bytes) are skipped and counted."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = Path(input_dir)
    if not root.exists():
        raise DataError(f"--input {str(root)!r} does not exist")
    if train_tokenizer is not None and train_tokenizer < 258:
        raise DataError(f"--train-tokenizer {train_tokenizer}: needs more than 257 tokens (256 bytes + end of "
                        "document) to learn any merge")
    corpus = Corpus(text_files(root, include), json_key, max_bytes)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    docs = tokens = 0
    builder = None
    try:
        if not any(True for _ in corpus.documents()):
            raise DataError(f"--input {str(root)!r} has no text files" + (f" matching {include}" if include else ""))
        choice = _choose_tokenizer(tokenizer, train_tokenizer, corpus, prefix, tmp)
        dtype = np.uint16 if choice.vocab_size < 65500 else np.int32
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        progress = Progress("tokenizing", corpus.total_bytes)
        for ids in _encoded(corpus, choice, progress):
            builder.add_item(torch.from_numpy(ids))
            builder.end_document()
            docs, tokens = docs + 1, tokens + len(ids)
        seconds = progress.close()
        builder.finalize(f"{tmp}.idx")
        nbytes = corpus.text_bytes
        meta = {"tokenizer": choice.kind, "tokenizer_path": str(choice.directory) if choice.directory else None,
                "vocab_size": choice.vocab_size, "eod": choice.eod, "documents": docs, "tokens": tokens,
                "bytes": nbytes, "skipped_files": corpus.skipped, "source": str(root.resolve()),
                "seconds": round(seconds, 2)}
        Path(f"{tmp}.json").write_text(json.dumps(meta, indent=1) + "\n")
        Path(f"{prefix}.idx").unlink(missing_ok=True)  # never pair an old index with the new .bin
        if Path(f"{tmp}.tokenizer").is_dir():
            shutil.rmtree(f"{prefix}.tokenizer", ignore_errors=True)
            os.replace(f"{tmp}.tokenizer", f"{prefix}.tokenizer")
        for ext in ("bin", "json", "idx"):  # .idx last: the pair is only complete once it exists
            os.replace(f"{tmp}.{ext}", f"{prefix}.{ext}")
    finally:
        # the builder's file may be a multi-storage-client handle that only creates the file
        # when closed: close it before cleaning up, or a stray temporary appears afterwards
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for ext in ("bin", "idx", "json"):
            Path(f"{tmp}.{ext}").unlink(missing_ok=True)
        shutil.rmtree(f"{tmp}.tokenizer", ignore_errors=True)
    return meta


def recipe_keys(meta: dict) -> str:
    """The dotted overrides that make any recipe read this dataset's tokens."""
    if meta["tokenizer"] == "bytes":
        return f"tokenizer.tokenizer_type=NullTokenizer tokenizer.vocab_size={VOCAB_SIZE}"
    return (f"tokenizer.tokenizer_type=HuggingFaceTokenizer tokenizer.tokenizer_model={meta['tokenizer_path']} "
            f"tokenizer.vocab_size={meta['vocab_size']} model.vocab_size=null")


def main_safe(args: argparse.Namespace) -> int:
    try:
        if args.max_bytes is not None and args.max_bytes < 1:
            raise DataError(f"--max-bytes must be positive, got {args.max_bytes}")
        meta = prepare(args.input, args.output, args.include, args.max_bytes, args.json_key, args.tokenizer,
                       args.train_tokenizer)
    except DataError as exc:
        print(f"megatron-sso prepare-data: error: {exc}", file=sys.stderr, flush=True)
        return 2
    took = (f" in {meta['seconds']:.1f} s ({meta['bytes'] / meta['seconds'] / 1e6:.1f} MB/s)"
            if meta["seconds"] >= 0.1 else "")
    what = ("bytes + end-of-document" if meta["tokenizer"] == "bytes"
            else f"{meta['tokenizer_path']} (end-of-document id {meta['eod']})")
    print(f"wrote {meta['tokens']} tokens ({meta['documents']} documents, {meta['bytes']} bytes; "
          f"{meta['skipped_files']} non-text files skipped) to {args.output}.bin/.idx{took}; "
          f"tokenizer: {what}, vocab_size {meta['vocab_size']}", flush=True)
    keys = recipe_keys(meta)
    print(f"recipe keys: {keys}", flush=True)
    print(f"train on it: megatron-sso pretrain --config configs/tiny_dense_cpu.yaml --data-path {args.output} {keys}",
          flush=True)
    return 0
