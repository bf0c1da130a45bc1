"""Text files are read a chunk at a time: the same tokens as reading them whole, in bounded memory."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import random
import tracemalloc

import numpy as np
import pytest

from gpt2cli.data import prepare as prep
from gpt2cli.data.prepare import TextFile, prepare_data, split_chunks, split_text
from gpt2cli.data.shards import TokenFolder
from gpt2cli.errors import UserError
from gpt2cli.specs import PrepareSpec
from gpt2cli.tokenizer import EOT_ID, encode

# Characters of 1 to 4 UTF-8 bytes, the places where a cut may or may not fall (single and double
# spaces and newlines, CRLF, tabs, a non-breaking space), and a byte-order mark inside the text.
ALPHABET = ["a", "b", "7", " ", "  ", "\n", "\n\n", "\r\n", "\t", "é", "日", "🤖", "\u00a0", "'", "\ufeff"]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def in_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_split_chunks_makes_the_cuts_of_split_text():
    """Wherever the chunks end (inside a CRLF, between two spaces, ...), the pieces are those of
    the whole text, so the tokens are too."""
    rng = random.Random(0)
    for _ in range(1500):
        text, max_chars = random_text(rng, rng.randint(0, 150)), rng.randint(1, 25)
        chunks = in_chunks(text, rng)
        assert list(split_chunks(chunks, max_chars)) == split_text(text, max_chars), (chunks, max_chars)
    assert list(split_chunks([], 10)) == [""]


def test_chunked_decoding_equals_decoding_the_whole_file(monkeypatch):
    """Characters cut between reads, a byte-order mark cut between reads, invalid bytes replaced
    (--errors replace) or named with their offset in the file (strict)."""
    rng = random.Random(1)
    byte_values = [0x61, 0x20, 0x0A, 0x0D, 0xC3, 0xA9, 0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0xA4, 0x96, 0xFF, 0xEF, 0xBB, 0xBF]
    for _ in range(1500):
        data = bytes(rng.choice(byte_values) for _ in range(rng.randint(0, 40)))
        data = codecs.BOM_UTF8 + data if rng.random() < 0.3 else data
        monkeypatch.setattr(prep, "READ_BYTES", rng.randint(1, 8))
        for errors in ("replace", "strict"):
            try:
                whole = prep._decode(data, errors, "f")
            except UserError as exc:
                whole = str(exc)
            try:
                chunked = "".join(prep._decode_chunks(io.BytesIO(data), errors, "f"))
            except UserError as exc:
                chunked = str(exc)
            assert chunked == whole, (data, errors)
    monkeypatch.setattr(prep, "READ_BYTES", 2)
    with pytest.raises(UserError, match=r"^f is not UTF-8 text \(byte 0xff at offset 6\)"):
        "".join(prep._decode_chunks(io.BytesIO(codecs.BOM_UTF8 + "é".encode() + b"a\xff"), "strict", "f"))


def test_a_text_file_read_in_small_chunks_gives_the_same_token_files(tmp_path, monkeypatch):
    rng = random.Random(2)
    text = random_text(rng, 3000)
    data = codecs.BOM_UTF8 + text.encode()
    read_bytes = 7
    starts = range(read_bytes, len(data), read_bytes)  # where the second and later reads begin
    assert sum(0x80 <= data[i] < 0xC0 for i in starts) > 50  # many reads begin inside a character
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data))

    def token_files(source: str, name: str, **settings) -> dict[str, bytes]:
        folder = TokenFolder(prepare_data(PrepareSpec(sources=[str(tmp_path / source)], out=str(tmp_path / name),
                                                      **settings)))
        return {split: (folder.path / f"{split}.bin").read_bytes() for split in folder.splits}

    whole = token_files("a.txt", "whole")  # the file fits in one read
    whole_tokens = np.frombuffer(whole["train"] + whole["val"], dtype="<u2").tolist()
    assert whole_tokens == encode(text) + [EOT_ID]  # the byte-order mark is dropped, CRLF kept
    monkeypatch.setattr(prep, "READ_BYTES", read_bytes)
    monkeypatch.setattr(prep, "PIECE_CHARS", 40)
    assert token_files("a.txt", "chunked") == whole
    assert token_files("a.txt.gz", "gzipped") == whole
    assert token_files("a.txt", "capped", max_tokens=500) == token_files("a.txt", "capped-one-read", max_tokens=500,
                                                                          num_proc=1)


def test_a_text_file_is_read_in_memory_that_does_not_grow_with_it(tmp_path, monkeypatch):
    """Reading and cutting a 2.4 MB file holds a read and a piece or two, not the file."""
    monkeypatch.setattr(prep, "READ_BYTES", 1 << 14)
    monkeypatch.setattr(prep, "PIECE_CHARS", 1 << 12)
    path = tmp_path / "big.txt"
    path.write_text("All the world's a stage, and all the men and women merely players. 日本\n" * 30_000)
    spec = PrepareSpec(sources=[str(path)])
    documents = TextFile(path).documents(spec)  # holds the file open
    assert len(next(next(documents))) <= 1 << 14  # the first text comes after one read
    documents.close()

    digest, longest = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        for piece in prep._pieces(prep.iter_documents([TextFile(path)], spec), prep.ValidationSelector(0.1),
                                  prep.SkipCount()):
            digest.update(piece.text.encode())
            longest = max(longest, len(piece.text))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()  # all of the text, in order
    assert longest < 2 << 12 and peak < 256 << 10, f"{peak:,} bytes"
