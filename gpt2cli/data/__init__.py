"""Data: corpus preparation (``prepare``), the token folder format (``shards``) and batches (``loader``).

The names are loaded on first use: ``gpt2 data`` needs no torch, and importing torch costs
about two seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2cli.data.loader import TrainLoader, eval_batches
    from gpt2cli.data.prepare import PrepareProgress, default_data_dir, prepare_data
    from gpt2cli.data.shards import TokenFolder

_EXPORTS = {
    "prepare_data": "gpt2cli.data.prepare",
    "default_data_dir": "gpt2cli.data.prepare",
    "PrepareProgress": "gpt2cli.data.prepare",
    "TokenFolder": "gpt2cli.data.shards",
    "TrainLoader": "gpt2cli.data.loader",
    "eval_batches": "gpt2cli.data.loader",
}

__all__ = ["PrepareProgress", "TokenFolder", "TrainLoader", "default_data_dir", "eval_batches", "prepare_data"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2cli.data' has no attribute {name!r}")
