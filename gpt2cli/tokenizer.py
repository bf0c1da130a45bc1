"""GPT-2 byte-level BPE, built from the ranks file bundled in the package. Never touches the network.

``tiktoken.get_encoding("gpt2")`` downloads its files on first use, and even
``tiktoken.load.load_tiktoken_bpe(local_path)`` copies the file into a cache folder under $TMPDIR.
So the bundled ``assets/gpt2.tiktoken`` is read and parsed here, its sha256 checked against the
hash tiktoken itself pins for OpenAI's r50k_base file (the same encoding as ``gpt2``), and the
``tiktoken.Encoding`` is built from the parsed ranks with tiktoken's own split pattern.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence
from importlib import resources

import numpy as np
import tiktoken

from gpt2cli.errors import UserError

TOKENIZER_NAME = "gpt2"
RANKS_FILE = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


def _read_asset(name: str) -> bytes:
    return (resources.files("gpt2cli") / "assets" / name).read_bytes()


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's ranks format: one ``<base64 token bytes> <rank>`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_ranks() -> dict[bytes, int]:
    """The bundled GPT-2 merge ranks, after checking that the file is the one we expect."""
    data = _read_asset(RANKS_FILE)
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise UserError(
            f"the bundled tokenizer file assets/{RANKS_FILE} is damaged (sha256 {digest[:12]}..., "
            f"expected {RANKS_SHA256[:12]}...)",
            "reinstall gpt2cli",
        )
    return parse_ranks(data)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (ids identical to ``tiktoken.get_encoding("gpt2")``), built once per process."""
    # r50k_pat_str is tiktoken's (faster, equivalent) form of GPT-2's pre-tokenizer regex; importing
    # it keeps us in step with the library instead of carrying a copy.
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=load_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` inside the text is encoded as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def encode_to_numpy(text: str) -> np.ndarray:
    """Like :func:`encode`, as a uint32 array (skips building a Python list; for bulk work)."""
    return get_tokenizer().encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of the token ids (invalid UTF-8 at a cut inside a character becomes U+FFFD)."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """Length in UTF-8 bytes of the text each token stands for; 0 for ``<|endoftext|>``.

    Summing it over a token array gives the number of text bytes those tokens encode, which is
    what bits-per-byte divides by.
    """
    enc = get_tokenizer()
    lengths = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for token_bytes, rank in enc._mergeable_ranks.items():
        lengths[rank] = len(token_bytes)
    return lengths
