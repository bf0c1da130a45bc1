"""Rotary position embeddings: the RoFormer formula, norms, relative positions, learnable freqs."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2cli.model import GPT
from gpt2cli.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq
from gpt2cli.specs import ModelSpec

HEAD_DIM = 16


def rotate(
    x: torch.Tensor, positions: list[int] | torch.Tensor, base: float = 10000.0
) -> torch.Tensor:
    """x: (B, H, T, D) rotated for the given T positions."""
    cos, sin = RotaryEmbedding(x.shape[-1], base)(torch.as_tensor(positions))
    return apply_rope(x, cos, sin)


def test_inverse_frequencies_follow_the_formula():
    inv_freq = rope_inv_freq(HEAD_DIM, 10000.0)
    expected = torch.tensor([10000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)])
    torch.testing.assert_close(inv_freq, expected)


def test_rotates_even_odd_pairs_by_position_times_theta():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, HEAD_DIM)
    pos = 7
    y = rotate(x, [pos])
    for i in range(HEAD_DIM // 2):
        angle = pos * 10000.0 ** (-2 * i / HEAD_DIM)
        a, b = x[0, 0, 0, 2 * i].item(), x[0, 0, 0, 2 * i + 1].item()
        assert y[0, 0, 0, 2 * i].item() == pytest.approx(
            a * math.cos(angle) - b * math.sin(angle), abs=1e-5
        )
        assert y[0, 0, 0, 2 * i + 1].item() == pytest.approx(
            a * math.sin(angle) + b * math.cos(angle), abs=1e-5
        )


def test_position_zero_is_identity():
    x = torch.randn(2, 3, 1, HEAD_DIM)
    torch.testing.assert_close(rotate(x, [0]), x)


def test_rotation_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, HEAD_DIM)
    y = rotate(x, torch.arange(50) * 13)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # ... and the norm of every (even, odd) pair, since each pair is rotated on its own.
    torch.testing.assert_close(
        y.unflatten(-1, (-1, 2)).norm(dim=-1),
        x.unflatten(-1, (-1, 2)).norm(dim=-1),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("m,n", [(0, 3), (5, 5), (17, 2), (40, 39)])
def test_dot_product_depends_only_on_relative_offset(m, n):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, HEAD_DIM), torch.randn(1, 1, 1, HEAD_DIM)
    reference = (rotate(q, [m]) * rotate(k, [n])).sum()
    for shift in (1, 10, 100, 1000):
        shifted = (rotate(q, [m + shift]) * rotate(k, [n + shift])).sum()
        assert shifted.item() == pytest.approx(reference.item(), abs=1e-4)
    assert not math.isclose(
        (rotate(q, [m + 1]) * rotate(k, [n])).sum().item(), reference.item(), abs_tol=1e-4
    )


def test_bf16_input_keeps_dtype_and_rotates_in_fp32():
    x = torch.randn(1, 2, 4, HEAD_DIM)
    y32 = rotate(x, [100, 200, 300, 400])
    y16 = rotate(x.bfloat16(), [100, 200, 300, 400])
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)


def spec(**fields) -> ModelSpec:
    return ModelSpec(
        vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="rope", **fields
    )


def test_fixed_frequencies_are_a_buffer_outside_the_state_dict():
    model = GPT(spec())
    assert "rope.inv_freq" not in model.state_dict()
    assert not any(name.startswith("rope") for name, _ in model.named_parameters())
    assert "transformer.wpe.weight" not in model.state_dict()  # RoPE replaces learned positions


def test_learnable_frequencies_are_parameters_that_get_gradients():
    torch.manual_seed(0)
    model = GPT(spec(rope_learnable=True))
    assert "rope.inv_freq" in model.state_dict()
    assert model.rope.inv_freq.requires_grad
    logits = model(torch.randint(0, 512, (2, 16)))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 512, (32,))).backward()
    grad = model.rope.inv_freq.grad
    assert grad is not None and grad.abs().sum() > 0
    # A step moves the frequencies away from the RoFormer initialisation.
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(model.rope.inv_freq.detach(), rope_inv_freq(8, 10000.0))


def test_rope_base_changes_the_frequencies():
    model = GPT(spec(rope_base=500.0))
    torch.testing.assert_close(model.rope.inv_freq, rope_inv_freq(8, 500.0))
