"""Named model sizes. Each preset is a partial ModelSpec; explicit fields override it.

``tiny`` is for tests (seconds on a CPU), ``nano`` trains in minutes on a laptop CPU (the default of
`gpt2 train`), ``mini`` in minutes on a GPU (the default on CUDA; the shape nanoGPT uses for
Shakespeare), and the four GPT-2 sizes have the published shapes.
"""

from __future__ import annotations

from typing import Any

_GPT2_COMMON: dict[str, Any] = {"vocab_size": 50257, "block_size": 1024}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 50257, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64},
    "nano": {"vocab_size": 50257, "block_size": 128, "n_layer": 4, "n_head": 8, "n_embd": 128},
    "mini": {"vocab_size": 50257, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384},
    "gpt2": {**_GPT2_COMMON, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {**_GPT2_COMMON, "n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {**_GPT2_COMMON, "n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {**_GPT2_COMMON, "n_layer": 48, "n_head": 25, "n_embd": 1600},
}

# Peak learning rates that train each size well (GPT-3 paper, table 2.1, for the GPT-2 sizes;
# measured on tiny Shakespeare for the small presets). `gpt2 train` uses them when --lr is absent.
RECOMMENDED_LR: dict[str, float] = {
    "tiny": 2e-3,
    "nano": 2e-3,
    "mini": 1e-3,
    "gpt2": 6e-4,
    "gpt2-medium": 3e-4,
    "gpt2-large": 2.5e-4,
    "gpt2-xl": 2e-4,
}
FALLBACK_LR = 6e-4  # a model without a preset (e.g. imported)
# Fine-tuning (gpt2 train --init): pretrained weights move a tenth as fast as from scratch by
# default (gpt2: 6e-5, in the range nanoGPT's and HF's GPT-2 fine-tuning recipes use).
FINETUNE_LR_SCALE = 0.1

# The preset `gpt2 train` uses when none is given, by device type.
DEFAULT_PRESET_CPU = "nano"
DEFAULT_PRESET_CUDA = "mini"


def preset_names() -> list[str]:
    return list(PRESETS)


def matching_preset(fields: dict[str, Any]) -> str | None:
    """The preset whose sizes ``fields`` (a ModelSpec's dump) have, if any: an imported model of
    GPT-2's shape is the gpt2 preset, with its recommended learning rate and run name."""
    return next((name for name, sizes in PRESETS.items()
                 if all(fields.get(k) == v for k, v in sizes.items())), None)
