"""``megatron-sso prepare-data``: a folder of text files -> a Megatron indexed dataset.

The tokenizer is byte-level (ids 0-255 are the UTF-8 bytes, 256 ends a document): it needs
no download and no training, round-trips exactly, and Bridge reads it with its own
``NullTokenizer`` of ``vocab_size: 257`` (whose end-of-document id is ``vocab_size - 1``).
Each file is one document. The ``.bin``/``.idx`` pair is written by megatron-core's
``IndexedDatasetBuilder`` under temporary names and renamed into place only when complete,
so an interrupted run never leaves a half-written dataset that training would accept.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path

EOD = 256
VOCAB_SIZE = 257


class DataError(ValueError):
    """Bad input for prepare-data; the message is one line for the user."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of text files (searched recursively)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--include", action="append", default=None,
                   help="file-name pattern to include (repeatable; default: every text file)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")


def text_files(root: Path, include: list[str] | None) -> list[Path]:
    """Sorted (deterministic) regular files under ``root`` matching ``include``."""
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


def prepare(input_dir: str | Path, output_prefix: str | Path, include: list[str] | None = None,
            max_bytes: int | None = None) -> dict:
    """Write the dataset; returns ``{"documents", "tokens", "bytes", "skipped", ...}``.
    Files that are not UTF-8 text (or contain NUL bytes) are skipped and counted."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"--input {str(root)!r} is not a folder")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    docs = tokens = nbytes = skipped = 0
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint16)
    try:
        for path in text_files(root, include):
            try:
                data = path.read_bytes()
            except OSError:
                skipped += 1
                continue
            if not data or not _is_text(data):
                skipped += 1
                continue
            if max_bytes is not None and nbytes + len(data) > max_bytes:
                data = data[: max_bytes - nbytes]
                if not data:
                    break
            ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
            builder.add_item(torch.from_numpy(np.append(ids, EOD)))
            builder.end_document()
            docs, tokens, nbytes = docs + 1, tokens + len(data) + 1, nbytes + len(data)
            if max_bytes is not None and nbytes >= max_bytes:
                break
        if docs == 0:
            raise DataError(f"--input {str(root)!r} has no text files"
                            + (f" matching {include}" if include else ""))
        builder.finalize(f"{tmp}.idx")
        meta = {"tokenizer": "bytes", "vocab_size": VOCAB_SIZE, "eod": EOD, "documents": docs,
                "tokens": tokens, "bytes": nbytes, "skipped_files": skipped, "source": str(root.resolve())}
        Path(f"{tmp}.json").write_text(json.dumps(meta, indent=1) + "\n")
        Path(f"{prefix}.idx").unlink(missing_ok=True)  # never pair an old index with the new .bin
        for ext in ("bin", "json", "idx"):  # .idx last: the pair is only complete once it exists
            os.replace(f"{tmp}.{ext}", f"{prefix}.{ext}")
    finally:
        # the builder's file may be a multi-storage-client handle that only creates the file
        # when closed: close it before cleaning up, or a stray temporary appears afterwards
        if not builder.data_file.closed:
            builder.data_file.close()
        for ext in ("bin", "idx", "json"):
            Path(f"{tmp}.{ext}").unlink(missing_ok=True)
    return meta


def main_safe(args: argparse.Namespace) -> int:
    try:
        if args.max_bytes is not None and args.max_bytes < 1:
            raise DataError(f"--max-bytes must be positive, got {args.max_bytes}")
        meta = prepare(args.input, args.output, args.include, args.max_bytes)
    except DataError as exc:
        print(f"megatron-sso prepare-data: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {meta['tokens']} tokens ({meta['documents']} documents, {meta['bytes']} bytes; "
          f"{meta['skipped_files']} non-text files skipped) to {args.output}.bin/.idx; "
          f"tokenizer: bytes + end-of-document, vocab_size {VOCAB_SIZE} "
          f"(tokenizer.tokenizer_type=NullTokenizer tokenizer.vocab_size={VOCAB_SIZE})", flush=True)
    return 0
