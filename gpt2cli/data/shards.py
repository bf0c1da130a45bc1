"""The token folder format written by `gpt2 data` and read by training and evaluation.

A prepared folder holds one flat file of token ids per split and a ``meta.json``::

    data/tinyshakespeare/
      train.bin    uint16 little-endian token ids, documents separated by <|endoftext|> (50256)
      val.bin
      meta.json    tokenizer, vocab size, dtype, per-split counts, source, fingerprint, spec, time

``meta.json`` is written last, inside a temporary folder that is renamed into place, so a folder
with a readable ``meta.json`` whose file sizes match its counts is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.errors import UserError

FORMAT_NAME = "gpt2cli-tokens"
FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKEN_DTYPE = np.dtype("<u2")  # every GPT-2 id (< 50257) fits; half the disk and page cache of int32
DTYPE_NAME = "uint16"
BYTE_ORDER = "little"


def split_file_name(split: str) -> str:
    return f"{split}.bin"


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` durably (it is the marker of a complete folder, so it goes last)."""
    path = folder / META_NAME
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(meta, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def fingerprint_files(folder: Path, splits: list[str]) -> str:
    """sha256 over every split's name, token count and token bytes: equal iff the tokens are equal."""
    digest = hashlib.sha256()
    for _ in _fingerprint_blocks(folder, splits, digest):
        pass
    return digest.hexdigest()


def _fingerprint_blocks(folder: Path, splits: list[str], digest) -> Iterator[tuple[str, bytes]]:
    """(split, block) of every split file in fingerprint order, each block already hashed into
    ``digest`` (with the split's name and token count before its first block)."""
    for split in sorted(splits):
        path = folder / split_file_name(split)
        size = path.stat().st_size
        digest.update(f"{split}\0{size // TOKEN_DTYPE.itemsize}\0".encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):  # an even number of bytes: whole tokens
                digest.update(block)
                yield split, block


@dataclass
class SplitCheck:
    """One split as :func:`verify_folder` read it."""

    split: str
    tokens: int
    max_id: int | None  # None for an empty split
    out_of_vocabulary: int  # ids at or above the folder's vocab_size
    first_out_of_vocabulary: int | None  # the position of the first of them


def verify_folder(folder: TokenFolder, on_bytes: Callable[[int], None] | None = None) -> tuple[bool, list[SplitCheck]]:
    """Read every token of ``folder``: whether they still hash to meta.json's fingerprint (a flipped
    byte anywhere changes it), and each split's largest id and ids outside the vocabulary (which the
    loader would otherwise refuse only when a batch holding one is drawn). ``on_bytes``: bytes read
    so far."""
    digest = hashlib.sha256()
    checks = {split: SplitCheck(split, folder.num_tokens(split), None, 0, None) for split in folder.splits}
    seen = {split: 0 for split in folder.splits}
    done = 0
    for split, block in _fingerprint_blocks(folder.path, folder.splits, digest):
        ids = np.frombuffer(block, dtype=TOKEN_DTYPE)
        check = checks[split]
        top = int(ids.max())
        check.max_id = top if check.max_id is None else max(check.max_id, top)
        if top >= folder.vocab_size:
            bad = np.flatnonzero(ids >= folder.vocab_size)
            if check.first_out_of_vocabulary is None:
                check.first_out_of_vocabulary = seen[split] + int(bad[0])
            check.out_of_vocabulary += len(bad)
        seen[split] += len(ids)
        done += len(block)
        if on_bytes is not None:
            on_bytes(done)
    return digest.hexdigest() == folder.fingerprint, [checks[s] for s in folder.splits]


def is_token_folder(path: str | Path) -> bool:
    """True if ``path`` is a complete prepared folder (cheap: no hashing)."""
    try:
        TokenFolder(path)
    except UserError:
        return False
    return True


class TokenFolder:
    """A folder written by `gpt2 data`, opened read-only.

    >>> folder = TokenFolder("data/tinyshakespeare")
    >>> folder.splits, folder.num_tokens("train")
    (['train', 'val'], 301966)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.meta = self._read_meta()
        self._check_files()

    # ----------------------------------------------------------------------------- reading

    def _read_meta(self) -> dict[str, Any]:
        hint = "prepare one with `gpt2 data ... --out DIR`"
        if self.path.is_file():  # usually the raw text, passed where its prepared folder belongs
            raise UserError(
                f"{str(self.path)!r} is a file, not a prepared data folder",
                f"prepare it with `gpt2 data {shlex.quote(str(self.path))} --out DIR`, then pass DIR",
            )
        if not self.path.is_dir():
            raise UserError(f"data folder {str(self.path)!r} does not exist", hint)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise UserError(f"{str(self.path)!r} is not a prepared data folder (no {META_NAME})", hint)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {str(meta_path)!r}: {exc}", "prepare the folder again") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise UserError(f"{str(meta_path)!r} is not a gpt2 data description", hint)
        if meta.get("version") != FORMAT_VERSION:
            raise UserError(
                f"{str(self.path)!r} has data format version {meta.get('version')}, this gpt2 reads "
                f"version {FORMAT_VERSION}",
                "prepare the folder again with this version of gpt2",
            )
        if meta.get("dtype") != DTYPE_NAME:
            found = "no dtype" if "dtype" not in meta else f"dtype {meta['dtype']!r}"
            raise UserError(
                f"{str(meta_path)!r} has {found}, this gpt2 reads token files of dtype {DTYPE_NAME!r}",
                "prepare the folder again with this version of gpt2",
            )
        if not isinstance(meta.get("splits"), dict):
            raise UserError(f"{str(meta_path)!r} is damaged (no table of splits)", "prepare the folder again")
        return meta

    def _check_files(self) -> None:
        """Every split file exists and holds exactly the tokens meta.json counts (catches truncation)."""
        for split, info in self.meta["splits"].items():
            path = self.path / split_file_name(split)
            expected = int(info["tokens"]) * TOKEN_DTYPE.itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                found = "missing" if actual is None else f"{actual:,} bytes"
                raise UserError(
                    f"{str(path)!r} is {found}, meta.json says {expected:,} bytes",
                    "the folder is incomplete or damaged; prepare it again",
                )

    # ----------------------------------------------------------------------------- accessors

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the token content (see :func:`fingerprint_files`)."""
        return str(self.meta["fingerprint"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def _split_info(self, split: str) -> dict[str, Any]:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise UserError(
                f"{str(self.path)!r} has no split {split!r} (splits: {', '.join(self.splits)})",
                "prepare it with --val-fraction > 0 for a validation split" if split == "val" else None,
            ) from None

    def num_tokens(self, split: str) -> int:
        return int(self._split_info(split)["tokens"])

    def num_documents(self, split: str) -> int:
        return int(self._split_info(split)["documents"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text the split's tokens encode (the denominator of bits-per-byte)."""
        return int(self._split_info(split)["text_bytes"])

    def tokens(self, split: str) -> np.memmap | np.ndarray:
        """The split's token ids, memory-mapped read-only (an empty split is an empty array)."""
        if self.num_tokens(split) == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map an empty file
        return np.memmap(self.path / split_file_name(split), dtype=TOKEN_DTYPE, mode="r")

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in self.splits)
        return f"TokenFolder({str(self.path)!r}, {counts})"
