"""Preset shapes: the GPT-2 sizes have exactly the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from gpt2cli.model import GPT
from gpt2cli.presets import PRESETS
from gpt2cli.specs import ModelSpec

GPT2_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def meta_model(spec: ModelSpec) -> GPT:
    with torch.device("meta"):  # shapes only: gpt2-xl would otherwise allocate 6 GB
        return GPT(spec)


@pytest.mark.parametrize("name,expected", GPT2_PARAMS.items())
def test_gpt2_presets_have_the_published_parameter_counts(name, expected):
    spec = ModelSpec(preset=name)
    assert spec.vocab_size == 50257 and spec.block_size == 1024
    model = meta_model(spec)
    assert model.num_params() == expected
    assert model.num_params(exclude_position_embeddings=True) == expected - 1024 * spec.n_embd


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_every_attention_and_position(name):
    for attn in ("mha", "gqa", "mqa"):
        for pos in ("learned", "rope"):
            spec = ModelSpec(preset=name, attn=attn, pos=pos)
            model = meta_model(spec)
            assert model.spec.kv_heads < spec.n_head or attn == "mha"
            assert (
                model.transformer.h[0].attn.c_attn.out_features
                == (spec.n_head + 2 * spec.kv_heads) * spec.head_dim
            )


def test_tiny_preset_runs_a_forward_pass():
    torch.manual_seed(0)
    model = GPT(ModelSpec(preset="tiny")).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 50257, (1, 16)))
    assert logits.shape == (1, 16, 50257) and torch.isfinite(logits).all()


def test_gqa_and_rope_change_the_count_as_expected():
    base = meta_model(ModelSpec(preset="gpt2")).num_params()
    C, L = 768, 12
    # GQA with 4 of 12 kv heads: c_attn loses 2 * 8 heads * 64 dims of output (weights and biases).
    gqa = meta_model(ModelSpec(preset="gpt2", attn="gqa", n_kv_head=4)).num_params()
    assert base - gqa == L * 2 * 8 * 64 * (C + 1)
    # RoPE drops the 1024 x 768 position table; learnable RoPE adds head_dim / 2 frequencies.
    assert base - meta_model(ModelSpec(preset="gpt2", pos="rope")).num_params() == 1024 * C
    learnable = meta_model(ModelSpec(preset="gpt2", pos="rope", rope_learnable=True)).num_params()
    assert learnable == base - 1024 * C + 32
