"""The network: GPT-2 with RoPE and grouped-query attention as options, and its KV cache.

Imports only torch and gpt2cli.specs/errors: no parallelism, CLI, data or checkpoint code.
Hugging Face import/export lives in :mod:`gpt2cli.model.hf`.
"""

from gpt2cli.model.gpt import GPT, Block, kv_cache_bytes_per_token
from gpt2cli.model.kv_cache import KVCache

__all__ = ["GPT", "Block", "KVCache", "kv_cache_bytes_per_token"]
