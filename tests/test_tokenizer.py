"""The GPT-2 tokenizer built from the bundled ranks file: known ids, round trips, no network."""

from __future__ import annotations

from importlib import resources

import pytest

from gpt2cli import tokenizer
from gpt2cli.errors import UserError
from gpt2cli.tokenizer import EOT_ID, RANKS_SHA256, TOKENIZER_NAME, decode, encode, get_tokenizer


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode("The quick brown fox jumps over the lazy dog.") == [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    enc = get_tokenizer()
    assert enc.name == TOKENIZER_NAME == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("Hello world<|endoftext|>", allowed_special="all") == [15496, 995, 50256]


def test_end_of_text_inside_text_is_ordinary():
    # Documents are separated by the EOT id we insert, never by text that happens to spell it.
    ids = encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize(
    "text",
    ["", "Hello world", "  leading and trailing  \n\n", "tabs\tand\r\nnewlines\n", "naïve café ünïcödé",
     "日本語のテキスト", "emoji 🤖🚀 and ZWJ 👩‍👩‍👧", "x" * 5000, "'s 're 've 'll 'd 123 4567"],
)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_equals_tiktokens_own_r50k_base(monkeypatch):
    """tiktoken's own r50k_base constructor (its loader, pattern and specials), fed our file
    instead of the download, gives the same encoding."""
    import tiktoken.load
    from tiktoken_ext import openai_public

    data = (resources.files("gpt2cli") / "assets" / "gpt2.tiktoken").read_bytes()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache copy
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: data)
    reference = tiktoken.Encoding(**openai_public.r50k_base())

    ours = get_tokenizer()
    assert ours._mergeable_ranks == reference._mergeable_ranks
    assert ours._pat_str == reference._pat_str
    assert ours._special_tokens == reference._special_tokens
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    text += " naïve 日本語 🤖 <|endoftext|> 'll 've\t\n\n  "
    assert encode(text) == reference.encode_ordinary(text)


def test_embedded_corpus_token_count():
    text = (resources.files("gpt2cli") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert len(encode(text)) == 338_025


def test_damaged_ranks_file_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer, "_read_asset", lambda name: b"AA== 0\n")
    with pytest.raises(UserError, match="damaged"):
        tokenizer.load_ranks()
    assert len(RANKS_SHA256) == 64


def test_token_byte_lengths_count_text_bytes():
    text = "héllo wörld 🤖"
    ids = encode(text)
    assert int(tokenizer.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8"))
    assert tokenizer.token_byte_lengths()[EOT_ID] == 0


def test_no_network_and_no_tiktoken_cache(monkeypatch, tmp_path):
    """Building the tokenizer reads only the bundled file: no download, no data-gym cache copy."""
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken's loader or downloader was called")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    get_tokenizer.cache_clear()
    try:
        assert encode("Hello world") == [15496, 995]
    finally:
        get_tokenizer.cache_clear()
    assert list(tmp_path.iterdir()) == []
