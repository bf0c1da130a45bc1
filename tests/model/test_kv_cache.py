"""KV-cache decoding gives what full recomputation gives, and stores only the kv heads."""

from __future__ import annotations

import pytest
import torch

from gpt2cli.model import GPT, KVCache
from gpt2cli.specs import ModelSpec

VARIANTS = [(attn, pos) for attn in ("mha", "gqa", "mqa") for pos in ("learned", "rope")]


def tiny_model(attn: str = "mha", pos: str = "learned", **fields) -> GPT:
    torch.manual_seed(0)
    kv = 2 if attn == "gqa" else None
    spec = ModelSpec(
        vocab_size=512,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_embd=32,
        attn=attn,
        n_kv_head=kv,
        pos=pos,
        **fields,
    )
    return GPT(spec).eval()


def greedy_full(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    idx = prompt
    for _ in range(steps):
        next_token = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
    return idx


def greedy_cached(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    B, T = prompt.shape
    model.setup_kv_cache(batch_size=B, max_seq_len=T + steps)
    try:
        logits = model(prompt, torch.arange(T))  # prefill
        tokens = [prompt]
        for t in range(T, T + steps):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            logits = model(next_token, torch.tensor([t]))  # one-token decode step
        return torch.cat(tokens, dim=1)
    finally:
        model.clear_kv_cache()


@pytest.mark.parametrize("attn,pos", VARIANTS)
def test_greedy_decoding_with_cache_equals_full_recomputation(attn, pos):
    model = tiny_model(attn, pos)
    prompt = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        assert torch.equal(greedy_cached(model, prompt, 20), greedy_full(model, prompt, 20))


@pytest.mark.parametrize("attn,pos", VARIANTS)
def test_cached_logits_equal_full_forward(attn, pos):
    """Prefill in two chunks, then single tokens: every position's logits match one full pass."""
    model = tiny_model(attn, pos)
    idx = torch.randint(0, 512, (3, 24))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=3)
        chunks = [model(idx[:, :10], torch.arange(10)), model(idx[:, 10:16], torch.arange(10, 16))]
        chunks += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn,pos", [("mha", "learned"), ("gqa", "rope")])
def test_attending_over_the_filled_slots_only_equals_the_whole_masked_cache(attn, pos):
    """kv_len (eager decoding reads only the slots written so far) gives the logits of the
    static-shape path, which reads the whole buffer under a mask; stale slots beyond are ignored."""
    model = tiny_model(attn, pos)
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        model.setup_kv_cache(batch_size=2)
        for block in model.transformer.h:  # garbage in every slot: must never be read
            block.attn.kv_cache.k_cache.normal_(0, 100)
            block.attn.kv_cache.v_cache.normal_(0, 100)
        # A prefill from 0 (plain causal), a second prefill chunk after it (a mask), single tokens
        # (every filled slot visible).
        whole = [model(idx[:, :5], torch.arange(5)), model(idx[:, 5:8], torch.arange(5, 8))]
        whole += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(8, 20)]
        filled = [model(idx[:, :5], torch.arange(5), kv_len=5), model(idx[:, 5:8], torch.arange(5, 8), kv_len=8)]
        filled += [model(idx[:, t : t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(8, 20)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(filled, dim=1), torch.cat(whole, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(filled, dim=1), model(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_cache_holds_only_the_kv_heads(attn, kv_heads):
    model = tiny_model(attn)
    model.setup_kv_cache(batch_size=3, max_seq_len=20, dtype=torch.bfloat16)
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    assert len(caches) == model.spec.n_layer
    for cache in caches:
        assert cache.k_cache.shape == cache.v_cache.shape == (3, kv_heads, 20, model.spec.head_dim)
        assert cache.k_cache.dtype == torch.bfloat16
    cached_bytes = sum(b.numel() * b.element_size() for c in caches for b in (c.k_cache, c.v_cache))
    assert cached_bytes == model.kv_cache_bytes_per_token(2) * 3 * 20
    assert "k_cache" not in " ".join(model.state_dict())  # scratch space, never in a checkpoint


def test_batch_smaller_than_the_cache_decodes():
    model = tiny_model("gqa", "rope")
    prompt = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        expected = model(prompt)
        model.setup_kv_cache(batch_size=4)
        torch.testing.assert_close(model(prompt, torch.arange(4)), expected, atol=1e-5, rtol=1e-5)


def test_cache_mode_needs_positions_and_clearing_restores_training_mode():
    model = tiny_model()
    idx = torch.randint(0, 512, (1, 6))
    model.setup_kv_cache(batch_size=1)
    with pytest.raises(ValueError, match="input_pos"):
        model(idx)
    model.clear_kv_cache()
    assert model(idx).shape == (1, 6, 512)
    with pytest.raises(ValueError, match="block_size"):
        model.setup_kv_cache(batch_size=1, max_seq_len=33)
