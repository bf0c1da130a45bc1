"""`gpt2 data`: any text corpus -> GPT-2 token files (the format is described in shards.py).

The pipeline streams, so corpora larger than memory work:

    sources -> documents (str, or a text file's chunks of ~4 MB) -> pieces of ~128K characters
            -> batches -> worker threads
            -> uint16 tokens (+ <|endoftext|> after each document) -> train.bin / val.bin

* Tokenization runs on ``num_proc`` threads: tiktoken releases the GIL while it encodes, so
  threads scale without pickling text into processes. Local files never go through
  ``datasets.map``, whose per-row overhead is several times the cost of BPE itself.
* Long documents are cut into pieces at places where GPT-2's pre-tokenizer would start a new
  piece anyway (see :func:`split_text`), so the tokens are identical to encoding the whole text.
  A text file is read and cut a chunk at a time (:func:`split_chunks` makes the same cuts as
  :func:`split_text` on the whole text), so memory does not grow with the size of a file.
* Results are consumed in submission order, so the output does not depend on thread timing: the
  same input gives byte-identical token files (meta.json differs only in ``created_at``).
* Everything is written into a hidden temporary folder next to the output, ``meta.json`` last,
  then renamed into place: an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from importlib import resources
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from gpt2cli import __version__
from gpt2cli.data.shards import (
    BYTE_ORDER,
    DTYPE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_NAME,
    TOKEN_DTYPE,
    fingerprint_files,
    is_token_folder,
    split_file_name,
    write_meta,
)
from gpt2cli.errors import UserError
from gpt2cli.fsutil import fsync_dir, remove_stale_staging, staging_path
from gpt2cli.specs import PrepareSpec
from gpt2cli.tokenizer import (
    EOT_ID,
    RANKS_SHA256,
    TOKENIZER_NAME,
    VOCAB_SIZE,
    get_tokenizer,
    token_byte_lengths,
)

EMBEDDED_NAME = "tinyshakespeare"
EMBEDDED_FILE = "tinyshakespeare.txt"

# Long documents are tokenized in pieces of about this many characters (so that one big file
# still spreads over all workers and never becomes one giant Python list); batches of pieces of
# about BATCH_CHARS are the unit of work handed to a thread.
PIECE_CHARS = 1 << 17
BATCH_CHARS = 1 << 19
# A text file is read this many bytes at a time: memory holds a chunk and the unfinished piece,
# not the file.
READ_BYTES = 1 << 22
# The validation split scans and copies token files this many tokens at a time (a chunk's
# cumulative byte counts are int64: 8 MB here).
SCAN_TOKENS = 1 << 20

TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_TYPES = ".txt, .md, .jsonl, .json or .parquet"


@dataclass(frozen=True)
class PrepareProgress:
    """What a progress callback receives after every batch of tokenized text."""

    documents: int
    tokens: int
    text_bytes: int
    elapsed_s: float


ProgressFn = Callable[[PrepareProgress], None]

# One document's text: a string, or an iterator of the consecutive chunks of a text too large to
# hold at once (a text file).
Document = str | Iterator[str]


# ===================================================================================== sources
#
# A source yields document texts. ``check`` runs for every source before anything is written,
# so missing columns, missing splits and an unreachable hub fail before the output folder exists.


def _open_binary(path: Path) -> IO[bytes]:
    return _GzipReader(path) if path.name.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


class _GzipReader:
    """A gzip file read the way the sources read files (read, lines, with), whose damage (not
    gzip at all, cut short, corrupt) is one UserError naming the file, wherever the reading has
    got to when it shows."""

    def __init__(self, path: Path) -> None:
        self._label = str(path)
        self._fh = gzip.open(path, "rb")

    def _checked(self, read: Callable[[int], bytes], size: int) -> bytes:
        try:
            return read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise UserError(f"{self._label} is not a whole gzip file ({exc})",
                            "compress it again, or pass the uncompressed file") from None

    def read(self, size: int = -1) -> bytes:
        return self._checked(self._fh.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._checked(self._fh.readline, size)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def __enter__(self) -> _GzipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def _not_utf8(where: str, byte: int, offset: int) -> UserError:
    return UserError(
        f"{where} is not UTF-8 text (byte 0x{byte:02x} at offset {offset:,})",
        "convert it to UTF-8, or pass --errors replace to substitute U+FFFD",
    )


def _decode(data: bytes, errors: str, where: str) -> str:
    """UTF-8 (a leading byte-order mark is dropped); strict mode names the place of a bad byte."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as exc:  # its offsets count from after the byte-order mark
        raise _not_utf8(where, data[bom + exc.start], bom + exc.start) from None


def _decode_chunks(fh: IO[bytes], errors: str, where: str) -> Iterator[str]:
    """The text of ``fh`` as :func:`_decode` gives it for the whole content, in chunks decoded
    READ_BYTES at a time: a character cut by a chunk boundary waits in the decoder for its last
    bytes, a leading byte-order mark is dropped, and a bad byte is named by its offset in the file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    block = fh.read(max(READ_BYTES, len(codecs.BOM_UTF8)))
    skip = len(codecs.BOM_UTF8) if block.startswith(codecs.BOM_UTF8) else 0
    offset = 0  # where ``block`` starts in the file
    while True:
        waiting = len(decoder.getstate()[0])  # bytes of an unfinished character from the last block
        try:
            text = decoder.decode(block[skip:], final=not block)
        except UnicodeDecodeError as exc:  # offsets count from the first waiting byte
            raise _not_utf8(where, exc.object[exc.start], offset + skip - waiting + exc.start) from None
        if text:
            yield text
        if not block:
            return
        offset += len(block)
        skip = 0
        block = fh.read(READ_BYTES)


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array"}


def _text_of(record: Any, column: str, where: str) -> str:
    """The document text in one JSON record (a plain string counts as the text itself)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        kind = _JSON_TYPES.get(type(record), type(record).__name__)
        raise UserError(f"{where} is a JSON {kind}, not an object with a text field", "each record must be an object or a string")
    if column not in record:
        columns = ", ".join(map(str, record)) or "none"
        raise UserError(f"{where} has no column {column!r} (columns: {columns})", "choose one with --text-column")
    return _column_text(record[column], column, where)


def _column_text(value: Any, column: str, where: str) -> str:
    if value is None:
        return ""  # a null value is an empty document: skipped, and counted in meta.json
    if not isinstance(value, str):
        raise UserError(
            f"{where}: column {column!r} holds {type(value).__name__} values, not text",
            "choose a text column with --text-column",
        )
    return value


def _file_suffix(path: Path) -> str:
    """The type suffix, looking through a trailing .gz (``a.jsonl.gz`` -> ``.jsonl``)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


class Source:
    """One input that yields documents."""

    label: str

    def check(self, spec: PrepareSpec) -> None:
        """Fail early (before any output exists) on problems that can be seen without reading it all."""

    def documents(self, spec: PrepareSpec) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class EmbeddedCorpus(Source):
    """The tiny Shakespeare corpus bundled in the package: one document."""

    label = EMBEDDED_NAME

    def _data(self) -> bytes:
        return (resources.files("gpt2cli") / "assets" / EMBEDDED_FILE).read_bytes()

    def documents(self, spec: PrepareSpec) -> Iterator[str]:
        yield self._data().decode("utf-8")

    def describe(self) -> dict[str, Any]:
        return {"kind": "embedded", "name": EMBEDDED_NAME, "sha256": hashlib.sha256(self._data()).hexdigest()}


class TextFile(Source):
    """A .txt/.md file: the whole file is one document, read a chunk at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def documents(self, spec: PrepareSpec) -> Iterator[Document]:
        with _open_binary(self.path) as fh:
            yield _decode_chunks(fh, spec.errors, self.label)  # read to the end before the file closes

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "path": self.label}


class JsonLinesFile(Source):
    """A .jsonl file: one JSON object per line, the text in ``text_column``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def documents(self, spec: PrepareSpec) -> Iterator[str]:
        with _open_binary(self.path) as fh:
            yield from _json_lines(fh, spec, self.label)

    def describe(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": self.label}


def _json_lines(lines: Iterable[bytes], spec: PrepareSpec, label: str) -> Iterator[str]:
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{label} line {number}"
        try:
            record = json.loads(_decode(raw, spec.errors, where))
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg})", "each line must hold one JSON object") from None
        yield _text_of(record, spec.text_column, where)


class JsonFile(Source):
    """A .json file: a list of records (or strings), a single record, or several top-level values
    (JSON lines). Read a chunk at a time, like a text file: the records of a top-level list come
    one by one (:class:`_JsonStream`), so memory holds one chunk and one record, not the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def documents(self, spec: PrepareSpec) -> Iterator[str]:
        with _open_binary(self.path) as fh:
            stream = _JsonStream(_decode_chunks(fh, spec.errors, self.label), self.label)
            first = stream.peek()
            if first is None:
                raise stream.invalid("Expecting value", stream.pos)
            if first == "[":
                yield from self._list_records(stream, spec)
                if stream.peek() is not None:  # e.g. "[...]\n[...]": lines of lists, not records
                    raise stream.invalid("Extra data", stream.pos)
                return
            lines = False  # several top-level values: JSON lines in a .json file, named by line
            while stream.peek() is not None:  # one record, or JSON lines
                line = stream.line_at(stream.pos)
                record = stream.value()
                lines = lines or stream.peek() is not None
                yield _text_of(record, spec.text_column, f"{self.label} line {line}" if lines else
                               f"{self.label} record 0")

    def _list_records(self, stream: _JsonStream, spec: PrepareSpec) -> Iterator[str]:
        stream.pos += 1  # the "["
        if stream.peek() == "]":
            stream.pos += 1
            return
        for index in itertools.count():
            yield _text_of(stream.value(), spec.text_column, f"{self.label} record {index}")
            after = stream.peek()
            stream.pos += 1
            if after == "]":
                return
            if after != ",":
                raise stream.invalid("Expecting ',' delimiter", stream.pos - 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": "json", "path": self.label}


_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _JsonStream:
    """JSON values, one at a time, from a text that arrives in chunks.

    ``buffer[pos:]`` is the unread text. :meth:`value` decodes the value at ``pos`` with
    ``json.JSONDecoder.raw_decode`` (the standard library's parser); when the buffer ends inside
    that value, it reads more text, at least as much again as the value's part so far (so a huge
    value is parsed a bounded number of times), and tries again. Text already read is dropped
    from the buffer as it is passed, so memory holds one chunk and the current value."""

    def __init__(self, chunks: Iterator[str], label: str) -> None:
        self._chunks = chunks
        self.label = label
        self.buffer = ""
        self.pos = 0
        self.eof = False
        self._lines_dropped = 0  # newlines in the text dropped from the front of the buffer

    def _read(self, at_least: int) -> None:
        """Append at least ``at_least`` characters (fewer at the end of the text)."""
        if self.pos > len(self.buffer) // 2:  # drop what was passed before growing the buffer
            self._lines_dropped += self.buffer.count("\n", 0, self.pos)
            self.buffer, self.pos = self.buffer[self.pos:], 0
        parts, got = [self.buffer], 0
        while got < at_least:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                break
            parts.append(chunk)
            got += len(chunk)
        self.buffer = "".join(parts)

    def peek(self) -> str | None:
        """The next character that is not whitespace (``pos`` moves to it); None at the end."""
        while True:
            self.pos = _JSON_SPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if self.eof:
                return None
            self._read(1)

    def value(self) -> Any:
        if self.peek() is None:  # raw_decode takes no whitespace before the value
            raise self.invalid("Expecting value", self.pos)
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or not self._may_go_on(exc):
                    raise self.invalid(exc.msg, exc.pos) from None
            else:
                # A number (or a literal) that ends with the buffer may go on in the next chunk.
                if end < len(self.buffer) or self.eof:
                    self.pos = end
                    return value
            self._read(max(READ_BYTES, len(self.buffer) - self.pos))

    def _may_go_on(self, exc: json.JSONDecodeError) -> bool:
        """Whether more text could make this error go away: a string still open, or an error
        within the last few characters (a number, literal or escape cut by the buffer's end)."""
        return exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buffer) - 8

    def line_at(self, pos: int) -> int:
        return self._lines_dropped + self.buffer.count("\n", 0, pos) + 1

    def invalid(self, message: str, pos: int) -> UserError:
        # json's own messages may end in " at" ("Invalid control character at")
        return UserError(f"{self.label} is not valid JSON ({message.removesuffix(' at')} at line {self.line_at(pos)})")


class ParquetFile(Source):
    """A .parquet file: one document per row of ``text_column``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def check(self, spec: PrepareSpec) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"cannot read {self.label} as parquet ({exc})".replace("\n", " ")) from None
        column = spec.text_column
        if column not in schema.names:
            raise UserError(
                f"{self.label} has no column {column!r} (columns: {', '.join(schema.names)})",
                "choose one with --text-column",
            )
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise UserError(
                f"{self.label}: column {column!r} holds {kind} values, not text", "choose a text column with --text-column"
            )

    def documents(self, spec: PrepareSpec) -> Iterator[str]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as table:
            for batch in table.iter_batches(batch_size=1024, columns=[spec.text_column]):
                for value in batch.column(0).to_pylist():
                    yield value or ""

    def describe(self) -> dict[str, Any]:
        return {"kind": "parquet", "path": self.label}


class HuggingFaceDataset(Source):
    """A folder written by ``datasets.save_to_disk``, or a dataset name on the Hugging Face Hub.

    ``datasets`` is imported only here: it is slow to import and most runs do not need it.
    """

    def __init__(self, *, saved_path: Path | None = None, hub_name: str | None = None) -> None:
        self.saved_path = saved_path
        self.hub_name = hub_name
        self.label = str(saved_path) if saved_path is not None else str(hub_name)
        self._dataset: Any = None

    def check(self, spec: PrepareSpec) -> None:
        dataset = self._load_saved(spec) if self.saved_path is not None else self._load_hub(spec)
        if spec.text_column not in dataset.column_names:
            raise UserError(
                f"dataset {self.label} has no column {spec.text_column!r} "
                f"(columns: {', '.join(dataset.column_names)})",
                "choose one with --text-column",
            )
        self._dataset = dataset

    def _load_saved(self, spec: PrepareSpec) -> Any:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(self.saved_path))
        except Exception as exc:  # datasets raises a variety of types for a damaged folder
            raise UserError(f"cannot load the saved dataset {self.label}: {_one_line(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise UserError(
                    f"saved dataset {self.label} has no split {spec.split!r} (splits: {', '.join(loaded)})",
                    "choose one with --split",
                )
            return loaded[spec.split]
        return loaded

    def _load_hub(self, spec: PrepareSpec) -> Any:
        """``load_dataset`` for a name that is not a local path, failing fast without a network.

        One quick request first tells whether the Hub answers at all. When it does not (or offline
        mode is on), the dataset is loaded in offline mode, so a copy in the Hugging Face cache
        still loads and anything else fails at once instead of after ~25 s of retries. The hub
        libraries' retry warnings are silenced: the one error line says what happened.
        """
        unreachable = _hub_unreachable_reason()
        import datasets

        try:
            with _quiet_hub_retries(), _hub_offline(unreachable is not None):
                return datasets.load_dataset(self.hub_name, spec.subset, split=spec.split)
        except ConnectionError as exc:  # OfflineModeIsEnabled, or the network dropped out meanwhile
            why = unreachable or f"no network: {_one_line(exc)}"
            raise UserError(
                f"no local file or folder {self.hub_name!r}, and no Hugging Face dataset of that name is "
                f"reachable ({why}; not in the local Hugging Face cache either)",
                "check the path; for a Hub dataset, "
                + ("unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE" if _offline_env() else "check the network"),
            ) from None
        except Exception as exc:  # not found, unknown subset or split, ...
            if (detail := _not_found_detail(exc)) is not None:
                raise UserError(
                    f"no local file or folder {self.hub_name!r}, and no Hugging Face dataset of that name ({detail})",
                    "check the path or the dataset name; a private or gated dataset needs `hf auth login`",
                ) from None
            raise UserError(
                f"cannot load dataset {self.hub_name!r}: {_one_line(exc)}", "check the dataset name, --subset and --split"
            ) from None

    def documents(self, spec: PrepareSpec) -> Iterator[str]:
        column = spec.text_column
        for batch in self._dataset.select_columns([column]).iter(batch_size=1000):
            for value in batch[column]:
                yield _column_text(value, column, f"dataset {self.label}")

    def describe(self) -> dict[str, Any]:
        if self.saved_path is not None:
            return {"kind": "saved_dataset", "path": self.label}
        return {"kind": "hub", "name": self.hub_name}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------- Hugging Face Hub access

HUB_CHECK_TIMEOUT_S = 10.0  # as huggingface_hub's own HF_HUB_ETAG_TIMEOUT; a refused or unresolvable host fails at once
_TRUE = ("1", "true", "yes", "on")


def _offline_env() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_unreachable_reason() -> str | None:
    """None when the Hub (``HF_ENDPOINT``) answers one quick request (any HTTP status counts),
    otherwise why not. No retries: without a network this takes milliseconds (a failed name
    lookup) or at most ``HUB_CHECK_TIMEOUT_S``. Proxy settings apply as for every Hub request."""
    from huggingface_hub import constants

    if _offline_env() or getattr(constants, "HF_HUB_OFFLINE", False):
        return "offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE"
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as exc:  # name resolution, refused, timeout, proxy, TLS, ...
        return f"no network: {_one_line(exc)}"
    return None


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Put ``huggingface_hub`` and ``datasets`` in offline mode for the duration (they read
    HF_HUB_OFFLINE once, at import): only the local cache is used, and nothing waits on retries."""
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    targets = [(constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in targets if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """Silence huggingface_hub's per-attempt HTTP warnings ("... thrown while requesting",
    "Retrying in 8s [Retry 5/5]"); the final error is reported as one line."""
    logger = logging.getLogger("huggingface_hub.utils._http")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _not_found_detail(exc: BaseException) -> str | None:
    """What to say when ``datasets`` found no dataset of that name on the Hub (or none this user
    may read); None for other errors (an unknown subset or split, a broken dataset, ...)."""
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(exc, DatasetNotFoundError):  # "Dataset 'x' doesn't exist on the Hub or cannot be accessed."
        return _one_line(exc)
    if isinstance(exc, FileNotFoundError) and "on the Hugging Face Hub either" in str(exc):
        return "the Hub did not provide it"  # datasets' own text here suggests a local folder
    return None


# ------------------------------------------------------------------------ resolving arguments

_GLOB_CHARS = re.compile(r"[*?\[]")
# owner/name or name, as the Hub spells dataset ids. A missing path that ends in a file suffix
# (letters only: ".csv", not the ".1" of "the-stack-v1.1") is reported missing, not looked up.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]{1,8}$")
# A missing SOURCE with one of these prefixes, or whose first component exists here (``src/notez``
# with a folder ``src``), is a mistyped local path: it is reported at once, never looked up.
_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\", "\\")


def _is_saved_dataset(folder: Path) -> bool:
    """``save_to_disk`` writes dataset_dict.json (DatasetDict) or state.json + dataset_info.json."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _file_source(path: Path) -> Source | None:
    suffix = _file_suffix(path)
    if suffix in TEXT_SUFFIXES:
        return TextFile(path)
    if suffix in JSONL_SUFFIXES:
        return JsonLinesFile(path)
    if suffix in JSON_SUFFIXES:
        return JsonFile(path)
    if suffix in PARQUET_SUFFIXES and not path.name.lower().endswith(".gz"):
        return ParquetFile(path)
    return None


def _written_by_gpt2_data(folder: Path) -> bool:
    """True for a folder written by `gpt2 data`: its meta.json names the token format (the folder
    may be damaged or from another version; it is still no text to read, nor another's to keep)."""
    try:
        meta = json.loads((folder / META_NAME).read_bytes())
    except (OSError, ValueError):  # no meta.json, or not JSON: someone else's file
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def _prepared_output_error(folder: Path) -> UserError:
    return UserError(
        f"{str(folder)!r} holds token files written by `gpt2 data`, not text",
        f"pass it to `gpt2 train --data {folder}`, or prepare its original sources",
    )


def _folder_sources(folder: Path) -> list[Source]:
    """Every supported file below ``folder``, in sorted path order (hidden entries and files of
    other types are skipped; a saved dataset inside is read as one dataset).

    Folders written by `gpt2 data` are skipped: the default output data/<name> lies below the
    folder when it is the current one, and its meta.json is no corpus. (The output itself is
    absent, empty or such a folder by the time sources are read, and its staging folder is hidden.)
    Links to folders are followed, each real folder read once, so a link to an ancestor ends there.
    """
    if _is_saved_dataset(folder):
        return [HuggingFaceDataset(saved_path=folder)]
    if _written_by_gpt2_data(folder):
        raise _prepared_output_error(folder)
    found: list[Source] = []
    skipped_outputs = False
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = Path(root)
        stat = os.stat(here)
        if (stat.st_dev, stat.st_ino) in seen:  # reached again through a link: read already
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in list(dirs):
            if _is_saved_dataset(here / name):
                found.append(HuggingFaceDataset(saved_path=here / name))
                dirs.remove(name)
            elif _written_by_gpt2_data(here / name):
                skipped_outputs = True
                dirs.remove(name)
        for name in sorted(files):
            source = None if name.startswith(".") else _file_source(here / name)
            if source is not None:
                found.append(source)
    if not found:
        raise UserError(
            f"folder {str(folder)!r} holds no {SUPPORTED_TYPES} files"
            + (" (folders written by `gpt2 data` are not read)" if skipped_outputs else ""),
            "check the path",
        )
    return found


def _path_sources(path: Path) -> list[Source]:
    if path.is_dir():
        return _folder_sources(path)
    if path.name == META_NAME and _written_by_gpt2_data(path.parent):
        raise _prepared_output_error(path.parent)
    source = _file_source(path)
    if source is None:
        raise UserError(
            f"{str(path)!r} has an unknown file type {_file_suffix(path) or 'without suffix'!r}",
            f"gpt2 data reads {SUPPORTED_TYPES} files, gzipped text files, folders of them and "
            "folders written by datasets.save_to_disk",
        )
    return [source]


def _glob_sources(argument: str, pattern: Path) -> list[Source]:
    """The supported files a glob matches, in sorted order. Like a folder's contents, other
    types and hidden files are skipped, and so are files in folders written by `gpt2 data` (their
    meta.json) and folders (``**`` matches a folder and the files in it; reading both would read
    the files twice), except saved datasets."""
    found: list[Source] = []
    prepared: dict[Path, bool] = {}  # folder -> written by `gpt2 data`: asked once per folder
    for match in _glob(pattern):
        path = Path(match)
        if path.is_dir():
            if _is_saved_dataset(path):
                found.append(HuggingFaceDataset(saved_path=path))
            continue
        if path.parent not in prepared:
            prepared[path.parent] = _written_by_gpt2_data(path.parent)
        if not path.name.startswith(".") and not prepared[path.parent] and (source := _file_source(path)) is not None:
            found.append(source)
    if not found:
        raise UserError(f"no {SUPPORTED_TYPES} files match {argument!r}", "check the pattern")
    return found


def _glob(pattern: Path) -> list[str]:
    """``sorted(glob.glob(pattern, recursive=True))``, except that ``**`` goes through links to
    folders without going round a loop, and reads a file reached by several links once.

    glob.glob went round a link to an ancestor until the path was 40 links deep, reading every
    file 40 times, and two such links took time exponential in that depth. Here the part before
    the first ``**`` is expanded by glob.glob; below it, a link to a folder is followed unless it
    leads back to a folder of the path it is on, and of the matches that are the same file (or
    dataset folder) under several names, the first in sorted order is kept. Wildcards do not
    match hidden names, as in glob."""
    parts = pattern.parts
    if "**" not in parts:
        return sorted(glob.glob(str(pattern), recursive=True))
    star = parts.index("**")
    head, wanted = (Path(*parts[:star]) if star else None), parts[star:]
    roots = [None] if head is None else [Path(r) for r in sorted(glob.glob(str(head))) if os.path.isdir(r)]
    names_hidden = any(part.startswith(".") for part in wanted)
    matches: list[str] = []
    for root in roots:
        top = root if root is not None else Path(".")
        if _glob_match(wanted, ()):  # "DIR/**" matches DIR itself, as glob.glob gives "DIR/"
            matches.append(str(top) + os.sep)
        top_text = str(top)
        on_path: dict[str, set[str]] = {top_text: {os.path.realpath(top)}}  # real folders above and at each
        for here_text, dirs, files in os.walk(top_text, followlinks=True):
            here = Path(here_text)
            above = on_path.pop(here_text)
            # glob's ** skips hidden folders (a part naming one, as ".cache", still reaches it)
            dirs[:] = sorted(d for d in dirs if names_hidden or not d.startswith("."))
            below = here.relative_to(top)
            for name in (*dirs, *files):
                relative = below / name
                if _glob_match(wanted, relative.parts):
                    matches.append(str(relative) if root is None else str(root / relative))
            kept = []
            for name in dirs:
                real = os.path.realpath(here / name)
                # A saved dataset is one source: its own files (state.json, ...) are not corpora.
                if real not in above and not _is_saved_dataset(here / name):
                    kept.append(name)
                    on_path[os.path.join(here_text, name)] = above | {real}  # as os.walk will name it
            dirs[:] = kept
    unique: dict[str, str] = {}
    for match in sorted(matches):
        unique.setdefault(os.path.realpath(match), match)
    return sorted(unique.values())


def _glob_match(parts: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether the names of a relative path match the pattern's parts, as glob.glob would: each
    part one name (fnmatch), ``**`` any number of names, and no wildcard taking a hidden name."""
    if not parts:
        return not names
    head, rest = parts[0], parts[1:]
    if head == "**":
        for taken in range(len(names) + 1):
            if taken and names[taken - 1].startswith("."):
                return False
            if _glob_match(rest, names[taken:]):
                return True
        return False
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatch(names[0], head) and _glob_match(rest, names[1:])


def _argument_sources(argument: str) -> list[Source]:
    """Turn one SOURCE argument into sources: a glob, a path, or a Hub dataset name."""
    path = Path(argument).expanduser()
    if _GLOB_CHARS.search(argument):
        return _glob_sources(argument, path)
    if path.exists():
        return _path_sources(path)
    first = Path(argument).parts[0] if Path(argument).parts else ""
    if argument.startswith(_LOCAL_PREFIXES) or first in (".", ".."):
        raise UserError(f"no such file or folder: {argument!r}", "check the path")
    if len(Path(argument).parts) > 1 and Path(first).exists():
        raise UserError(
            f"no such file or folder: {argument!r}",
            f"check the path: {first!r} exists here, so this is a local path, not a Hugging Face dataset name",
        )
    if _HUB_NAME.match(argument) and not _FILE_SUFFIX.search(argument):
        return [HuggingFaceDataset(hub_name=argument)]
    raise UserError(f"no such file or folder: {argument!r}", "check the path")


def resolve_sources(spec: PrepareSpec) -> list[Source]:
    """The sources named by the spec (the embedded corpus when there are none), checked."""
    sources: list[Source] = (
        [s for argument in spec.sources for s in _argument_sources(argument)] if spec.sources else [EmbeddedCorpus()]
    )
    for source in sources:
        source.check(spec)
    return sources


@dataclass
class SkipCount:
    """Empty documents passed over while reading (empty files, empty or null text fields)."""

    empty: int = 0


def _unless_empty(document: Document) -> Document | None:
    """The document, or None when it holds no text (a chunked one is read up to its first text)."""
    if isinstance(document, str):
        return document or None
    first = next((chunk for chunk in document if chunk), None)
    return None if first is None else chain([first], document)


def iter_documents(sources: list[Source], spec: PrepareSpec, skipped: SkipCount | None = None) -> Iterator[Document]:
    """Every non-empty document of every source, in order, at most ``max_docs`` of them.
    Empty documents are skipped; ``skipped.empty`` counts those read so far. A chunked document
    must be read to its end before the next one is asked for (its file closes then)."""

    def non_empty() -> Iterator[Document]:
        for source in sources:
            for document in source.documents(spec):
                if (kept := _unless_empty(document)) is not None:
                    yield kept
                elif skipped is not None:
                    skipped.empty += 1

    documents = non_empty()
    return islice(documents, spec.max_docs) if spec.max_docs is not None else documents


# ========================================================================= splitting the text

# A piece boundary of GPT-2's pre-tokenizer that a cut cannot move: before a single space that
# sits between two non-space characters (a piece starts at " word", the previous one ends before
# it), or after a single newline between two non-space characters (the newline is its own piece).
# Python's \s covers every character of Unicode's White_Space (which the tokenizer's regex uses)
# and a few more, so \S here is never wrong on the safe side.
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=\S\n)(?=\S)")


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``max_chars`` whose tokens, concatenated, equal the
    tokens of the whole text: while more than ``max_chars`` remain, the next piece ends at the
    first safe cut at least ``max_chars`` after its start. Text without a safe cut stays whole."""
    return list(split_chunks([text], max_chars))


def split_chunks(chunks: Iterable[str], max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces :func:`split_text` makes of the text the ``chunks`` add up to, found as the
    chunks come: memory holds one chunk and the unfinished piece (all of a text without a cut).

    A cut found in the text read so far is the one found in the whole text: the pattern looks at
    most one character ahead, and only at a cut at the last character (or the end) can text still
    to come change the answer, so the search resumes there. It looks two characters behind, so
    those stay when the finished pieces are dropped. At least one piece ("" for no text) comes.
    """
    buffer = ""  # the text from two characters before the unfinished piece on
    start = 0  # where the unfinished piece starts in ``buffer``
    no_cut_before = 0  # buffer positions before this are known not to be cuts
    for chunk in chunks:
        kept = max(start - 2, 0)
        buffer = buffer[kept:] + chunk
        start -= kept
        no_cut_before = max(no_cut_before - kept, 0)
        while len(buffer) - start > max_chars:
            cut = _SAFE_CUT.search(buffer, max(start + max_chars, no_cut_before))
            if cut is None:
                no_cut_before = len(buffer) - 1
                break
            yield buffer[start : cut.start()]
            start = cut.start()
    yield buffer[start:]


class ValidationSelector:
    """Chooses validation documents while streaming, without knowing how many will come.

    Document ``i`` goes to validation when ``floor((i + 1) * f) > floor(i * f)``: exactly
    ``floor(n * f)`` of the first ``n`` documents, spread evenly over the corpus (with f = 0.1,
    documents 9, 19, 29, ...), so validation samples every source rather than the last files,
    and is the same on every run. The fraction is taken as the exact decimal the user wrote
    (0.1 is 1/10, not the float slightly above it).
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = Fraction(repr(fraction))

    def is_validation(self, index: int) -> bool:
        f = self.fraction
        return (index + 1) * f.numerator // f.denominator > index * f.numerator // f.denominator


# =========================================================================== tokenizing

@dataclass(frozen=True)
class _Piece:
    text: str
    to_val: bool
    last: bool  # the end of its document: <|endoftext|> follows
    first: bool  # the start of its document (counts the document)
    empty_before: int = 0  # empty documents skipped before this one's, in all


def _pieces(documents: Iterable[Document], selector: ValidationSelector, skipped: SkipCount) -> Iterator[_Piece]:
    for index, document in enumerate(documents):
        to_val = selector.is_validation(index)
        parts = split_chunks([document] if isinstance(document, str) else document, PIECE_CHARS)
        # a piece goes out once the next one is known: whether it is the last decides its <|endoftext|>
        part, first = next(parts), True
        for following in parts:
            yield _Piece(part, to_val, last=False, first=first, empty_before=skipped.empty)
            part, first = following, False
        yield _Piece(part, to_val, last=True, first=first, empty_before=skipped.empty)


def _batches(pieces: Iterable[_Piece], batch_chars: int) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_ids(text: str) -> np.ndarray:
    enc = get_tokenizer()
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        # lone surrogates (e.g. from a JSON "\ud800" escape) cannot go to Rust; replace them
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def _encode_batch(batch: list[_Piece]) -> list[tuple[np.ndarray, int]]:
    """Runs on a worker thread: (uint16 tokens with EOT after a document's end, text bytes)."""
    byte_lengths = token_byte_lengths()
    encoded = []
    for piece in batch:
        ids = _encode_ids(piece.text)
        tokens = np.empty(len(ids) + piece.last, dtype=TOKEN_DTYPE)
        tokens[: len(ids)] = ids
        if piece.last:
            tokens[-1] = EOT_ID
        encoded.append((tokens, int(byte_lengths[ids].sum())))
    return encoded


class _SplitFile:
    """One split's token file being written, with its counts."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.path = folder / split_file_name(name)
        self.file: IO[bytes] = open(self.path, "wb", buffering=1 << 20)
        self.tokens = 0
        self.documents = 0
        self.text_bytes = 0

    def write(self, tokens: np.ndarray, text_bytes: int) -> None:
        self.file.write(tokens.data)
        self.tokens += len(tokens)
        self.text_bytes += text_bytes

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def info(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "text_bytes": self.text_bytes,
        }


class _TokenWriter:
    """Writes encoded pieces to the split files in order, enforcing ``max_tokens``."""

    def __init__(self, folder: Path, *, with_val: bool, max_tokens: int | None) -> None:
        self.train = _SplitFile(folder, "train")
        self.val = _SplitFile(folder, "val") if with_val else None
        self.max_tokens = max_tokens
        self.documents = 0
        self.last_train_doc_start = 0  # token offset of the newest training document
        self.full = False
        # Empty documents skipped before the last document written. Counted by what was written,
        # not by what was read: reading runs ahead of writing by a number of batches that depends
        # on the number of threads, and meta.json must not.
        self.empty_documents = 0

    @property
    def tokens(self) -> int:
        return self.train.tokens + (self.val.tokens if self.val else 0)

    @property
    def text_bytes(self) -> int:
        return self.train.text_bytes + (self.val.text_bytes if self.val else 0)

    def write_batch(self, batch: list[_Piece], encoded: list[tuple[np.ndarray, int]]) -> None:
        for piece, (tokens, text_bytes) in zip(batch, encoded, strict=True):
            if self.full:
                return
            self._write_piece(piece, tokens, text_bytes)

    def _write_piece(self, piece: _Piece, tokens: np.ndarray, text_bytes: int) -> None:
        if self.max_tokens is not None:
            room = self.max_tokens - self.tokens
            if len(tokens) >= room:
                self.full = True
                if room < (2 if piece.first else 1):
                    return  # not even one text token plus <|endoftext|> fits
                # cut the document short, still ending it with <|endoftext|>
                tokens = np.append(tokens[: room - 1], np.array([EOT_ID], dtype=TOKEN_DTYPE))
                text_bytes = int(token_byte_lengths()[tokens].sum())
        split = self.val if piece.to_val and self.val is not None else self.train
        if piece.first:
            self.documents += 1
            self.empty_documents = piece.empty_before
            split.documents += 1
            if split is self.train:
                self.last_train_doc_start = self.train.tokens
        split.write(tokens, text_bytes)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()

    def splits(self) -> list[_SplitFile]:
        return [self.train] + ([self.val] if self.val is not None else [])


def _tokenize(
    sources: list[Source], spec: PrepareSpec, folder: Path, workers: int, progress: ProgressFn | None
) -> _TokenWriter:
    """Tokenize every document into ``folder``; results are written in submission order."""
    writer = _TokenWriter(folder, with_val=spec.val_fraction > 0, max_tokens=spec.max_tokens)
    skipped = SkipCount()
    documents = iter_documents(sources, spec, skipped)
    batches = _batches(_pieces(documents, ValidationSelector(spec.val_fraction), skipped), BATCH_CHARS)
    pending: deque[tuple[list[_Piece], Future]] = deque()
    in_flight = workers + 2  # keeps every worker busy while the main thread reads and writes
    started = time.perf_counter()

    def write_results(keep: int) -> None:
        while len(pending) > keep and not writer.full:
            batch, future = pending.popleft()
            writer.write_batch(batch, future.result())
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(PrepareProgress(writer.documents, writer.tokens, writer.text_bytes, elapsed))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpt2-tokenize")
    try:
        for batch in batches:
            if writer.full:
                break
            pending.append((batch, pool.submit(_encode_batch, batch)))
            write_results(keep=in_flight)
        write_results(keep=0)
        if not writer.full:  # every document was read: count the empty ones after the last, too
            writer.empty_documents = skipped.empty
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        batches.close()  # closes the file the sources are reading
        writer.close()
    return writer


# ======================================================================= validation split

def _token_chunks(path: Path, start: int = 0) -> Iterator[np.ndarray]:
    """The tokens of ``path`` from index ``start`` on, SCAN_TOKENS at a time. Read, not mapped:
    the pages of a mapped file would count in the process's memory as they were read."""
    with open(path, "rb") as fh:
        fh.seek(start * TOKEN_DTYPE.itemsize)
        while block := fh.read(SCAN_TOKENS * TOKEN_DTYPE.itemsize):
            yield np.frombuffer(block, dtype=TOKEN_DTYPE)


def _token_index_at_byte(path: Path, cut_bytes: int) -> int:
    """The number of leading tokens whose text fits in ``cut_bytes`` bytes (chunked, so a huge
    single document never needs its cumulative sums in memory at once)."""
    byte_lengths = token_byte_lengths()
    seen_bytes = seen_tokens = 0
    for chunk in _token_chunks(path):
        cumulative = np.cumsum(byte_lengths[chunk]) + seen_bytes
        if cumulative[-1] > cut_bytes:
            return seen_tokens + int(np.searchsorted(cumulative, cut_bytes, side="right"))
        seen_bytes, seen_tokens = int(cumulative[-1]), seen_tokens + len(chunk)
    return seen_tokens


def _copy_tail(source: Path, start: int, target: Path) -> int:
    """Copy tokens ``start:`` of ``source`` into a new file ``target``; returns their text bytes."""
    byte_lengths = token_byte_lengths()
    text_bytes = 0
    with open(target, "wb") as out:
        for chunk in _token_chunks(source, start):
            out.write(chunk.data)
            text_bytes += int(byte_lengths[chunk].sum())
        out.flush()
        os.fsync(out.fileno())
    return text_bytes


def _move_train_tail_to_val(writer: _TokenWriter, start: int) -> None:
    """Move the training tokens from ``start`` on into the (still empty) validation file."""
    train, val = writer.train, writer.val
    assert val is not None and val.tokens == 0
    moved_bytes = _copy_tail(train.path, start, val.path)
    os.truncate(train.path, start * TOKEN_DTYPE.itemsize)
    val.tokens = train.tokens - start
    val.text_bytes = moved_bytes
    train.tokens = start
    train.text_bytes -= moved_bytes


def _finish_validation_split(writer: _TokenWriter, fraction: float) -> str:
    """Settle the cases the streaming rule cannot decide; returns how the split was made.

    * one document: split by position; the tail with ``fraction`` of the text bytes goes to
      validation, cut at a token boundary (tiny Shakespeare gives nanoGPT's 301,966 / 36,059),
      and at least the last text token does, as at least one document does below;
    * several documents but fewer than 1 / fraction: the last document goes to validation.
    """
    if writer.val is None:
        return "none"
    train = writer.train
    if writer.documents == 1:
        cut_bytes = int(train.text_bytes * (1 - fraction))
        # The tokens end in text then <|endoftext|>; a fraction so small that 1 - fraction rounds
        # to 1 would otherwise leave validation with nothing.
        last_text_token = train.tokens - 2
        cut = min(_token_index_at_byte(train.path, cut_bytes), last_text_token)
        _move_train_tail_to_val(writer, cut)
        writer.val.documents = 1  # both splits hold part of the one document
        return "position"
    if writer.val.documents == 0:
        _move_train_tail_to_val(writer, writer.last_train_doc_start)
        train.documents -= 1
        writer.val.documents = 1
    return "documents"


# ====================================================================== output folder

def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "-", name).strip("-.")
    return cleaned or "corpus"


def source_name(spec: PrepareSpec) -> str:
    """A folder name for the corpus: the embedded corpus, the first file/folder, or the dataset."""
    if not spec.sources:
        return EMBEDDED_NAME
    first = spec.sources[0]
    path = Path(first).expanduser()
    if _GLOB_CHARS.search(first):
        parts = [part for part in path.parts if not _GLOB_CHARS.search(part)]
        return _safe_name(parts[-1] if parts else "corpus")
    if path.exists():
        resolved = path.resolve()
        name = resolved.name if resolved.is_dir() else resolved.name.split(".")[0]
        return _safe_name(name)
    name = first.rsplit("/", 1)[-1]  # a hub name: owner/name -> name
    return _safe_name(f"{name}-{spec.subset}" if spec.subset else name)


def output_dir(spec: PrepareSpec) -> Path:
    """Where the spec writes: ``out``, or data/<name of the source>."""
    return Path(spec.out).expanduser() if spec.out else Path("data") / source_name(spec)


def _existing_output(out: Path, overwrite: bool) -> str:
    """How to publish into ``out``: "new" (absent or empty folder) or "replace"."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UserError(f"output {str(out)!r} is a file, not a folder", "choose another --out")
    if not any(out.iterdir()):
        return "new"  # an empty folder is replaced by the rename
    if not overwrite:
        raise UserError(f"output folder {str(out)!r} already exists", "pass --overwrite to replace it, or choose another --out")
    if not _written_by_gpt2_data(out):
        raise UserError(
            f"refusing to overwrite {str(out)!r}: it is not a folder written by `gpt2 data` "
            f"(no {META_NAME} of format {FORMAT_NAME!r})",
            "choose another --out",
        )
    return "replace"


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then take effect as usual: a stop never
    falls between moving the old output aside and renaming the new one into place (which would
    leave neither at ``out``). Only the main thread can change signal handlers; elsewhere (no
    handler runs there anyway) nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def _publish(staging: Path, out: Path, mode: str) -> None:
    """Rename the finished staging folder to ``out``; SIGINT/SIGTERM wait for the renames.

    mode "new": ``out`` must not have appeared meanwhile; "replace": an existing ``out`` is moved
    aside first; "keep": if another process published ``out`` first, use theirs.
    """
    if mode == "replace" and out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with _signals_held():
                os.rename(out, trash)
                try:
                    os.rename(staging, out)
                except BaseException:
                    os.rename(trash, out)  # the old output goes back
                    raise
        finally:
            if trash.exists() and out.exists():
                shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(staging, out)
        except OSError:  # ENOTEMPTY / EEXIST: someone else's folder is there now
            shutil.rmtree(staging, ignore_errors=True)
            if mode == "keep" and is_token_folder(out):
                return
            raise UserError(
                f"output folder {str(out)!r} appeared while preparing", "pass --overwrite to replace it"
            ) from None
    fsync_dir(out.parent)


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders; returns those created (to remove them again on failure)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _build_meta(
    spec: PrepareSpec, sources: list[Source], writer: _TokenWriter, split_by: str, folder: Path
) -> dict[str, Any]:
    splits = {s.name: s.info() for s in writer.splits()}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": {"name": TOKENIZER_NAME, "ranks_sha256": RANKS_SHA256, "eot_id": EOT_ID},
        "vocab_size": VOCAB_SIZE,
        "dtype": DTYPE_NAME,
        "byte_order": BYTE_ORDER,
        "splits": splits,
        "documents": writer.documents,
        "empty_documents": writer.empty_documents,
        "split_by": split_by,
        "source": [source.describe() for source in sources],
        "fingerprint": fingerprint_files(folder, list(splits)),
        "spec": spec.model_dump(mode="json"),
        "gpt2cli_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _sources_named(spec: PrepareSpec) -> str:
    return ", ".join(spec.sources) if spec.sources else "the embedded corpus"


def _nothing_written_error(spec: PrepareSpec, writer: _TokenWriter) -> UserError:
    if writer.full:  # there was text, but the first document did not fit
        return UserError(
            f"--max-tokens {spec.max_tokens} leaves no room for a document: the shortest takes 2 tokens "
            "(one of text and <|endoftext|>)",
            "pass --max-tokens 2 or more",
        )
    empty = writer.empty_documents
    why = {0: "no documents", 1: "the one document read is empty"}.get(empty, f"all {empty:,} documents are empty")
    return UserError(f"no text found in {_sources_named(spec)} ({why})", "check the sources and --text-column")


def _empty_train_error(spec: PrepareSpec, writer: _TokenWriter) -> UserError:
    """Validation took every token (one document of a token or so): training would have nothing."""
    text_tokens = writer.tokens - writer.documents  # each document ends with an <|endoftext|>
    counted = f"{text_tokens:,} token{'' if text_tokens == 1 else 's'} of text"
    if writer.full:
        counted += f" within --max-tokens {spec.max_tokens}"
    fixes = "raise --max-tokens" if writer.full else "give more text"
    return UserError(
        f"the training split would be empty: {_sources_named(spec)} gives {counted}, "
        f"and --val-fraction {spec.val_fraction:g} sends all of it to validation",
        f"{fixes}, or pass a smaller --val-fraction, such as 0 for no validation split",
    )


def _prepare(spec: PrepareSpec, out: Path, mode: str, progress: ProgressFn | None) -> Path:
    # Every path, column and split is checked before writing. The output is absent, empty or a
    # folder written by `gpt2 data` (see _existing_output), so no source is read from it.
    sources = resolve_sources(spec)
    workers = spec.num_proc or default_workers()
    resolved = spec.model_copy(update={"out": str(out), "num_proc": workers})
    created_parents = _make_parents(out.parent)
    remove_stale_staging(out)
    staging = staging_path(out)
    staging.mkdir()
    try:
        writer = _tokenize(sources, resolved, staging, workers, progress)
        if writer.documents == 0:
            raise _nothing_written_error(spec, writer)
        split_by = _finish_validation_split(writer, spec.val_fraction)
        if writer.train.tokens == 0:
            raise _empty_train_error(spec, writer)
        write_meta(staging, _build_meta(resolved, sources, writer, split_by, staging))
        fsync_dir(staging)
        _publish(staging, out, mode)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created_parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (someone else uses it) or gone: stop there
        raise
    return out


def prepare_data(spec: PrepareSpec, progress: ProgressFn | None = None) -> Path:
    """Tokenize the spec's sources into a token folder and return its path (see docs/data.md).

    ``progress`` is called after every batch with a :class:`PrepareProgress`.
    Raises :class:`~gpt2cli.errors.UserError` for anything the user can fix; nothing is left
    behind then (the output appears only once it is complete).
    """
    out = output_dir(spec)
    mode = _existing_output(out, spec.overwrite)
    return _prepare(spec, out, mode, progress)


# ===================================================================== default corpus

# The PrepareSpec fields that change the tokens (not where they go or how fast they are made).
_CONTENT_FIELDS = ("sources", "text_column", "subset", "split", "val_fraction", "max_docs", "max_tokens", "errors")


def cache_root() -> Path:
    """``$GPT2_CACHE_DIR``, else ~/.cache/gpt2cli."""
    env = os.environ.get("GPT2_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2cli"


def settings_key(spec: PrepareSpec) -> str:
    """A short hash of everything that decides the prepared tokens."""
    settings = {
        "format": FORMAT_VERSION,
        "tokenizer": RANKS_SHA256,
        "corpus": EmbeddedCorpus().describe()["sha256"] if not spec.sources else None,
        "spec": {name: getattr(spec, name) for name in _CONTENT_FIELDS},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def embedded_data_dir() -> Path:
    """Where :func:`default_data_dir` keeps the prepared embedded corpus (which may not exist yet)."""
    return cache_root() / f"{EMBEDDED_NAME}-{settings_key(PrepareSpec())}"


def default_data_dir(progress: ProgressFn | None = None) -> Path:
    """The embedded corpus, prepared on first use into the cache and reused afterwards.

    Safe when several processes (torchrun ranks) call it at once: each prepares into its own
    temporary folder, the first rename wins, and the others use the winner's folder.
    """
    spec = PrepareSpec()
    target = embedded_data_dir()
    if is_token_folder(target):
        return target
    mode = "replace" if target.exists() and any(target.iterdir()) else "keep"
    spec = spec.model_copy(update={"out": str(target)})
    return _prepare(spec, target, mode, progress)
