"""The single-process strategy's gradient clipping (DDP and FSDP share it; their multi-process
equality with one process is in tests/test_parallel.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2cli.parallel.base import Strategy


def output_layer_with_gradient() -> tuple[nn.Linear, torch.Tensor]:
    """A GPT-2-sized output layer whose gradient is like a real one: a few large rows (the
    batch's tokens) and 50,000 rows of small entries that together carry a third of the norm.
    torch's fp32 CPU reduction puts this norm about 8e-4 low."""
    layer = nn.Linear(128, 50257, bias=False)
    rng = torch.Generator().manual_seed(0)
    grad = torch.rand(50257, 128, generator=rng) * 2e-3
    grad[:8] = torch.randn(8, 128, generator=rng) * 0.3
    return layer, grad


def test_cpu_clipping_uses_the_exact_global_norm():
    layer, grad = output_layer_with_gradient()
    exact = float(grad.double().norm())
    layer.weight.grad = grad.clone()
    norm = Strategy("cpu").clip_grad_norm(layer, max_norm=1.0)
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(exact, rel=1e-7)
    assert float(layer.weight.grad.double().norm()) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(layer.weight.grad, grad / (exact + 1e-6))  # one factor for every entry


def test_cpu_clipping_leaves_small_gradients_alone_and_zero_only_measures():
    layer, grad = output_layer_with_gradient()
    exact = float(grad.double().norm())
    for max_norm in (0.0, 2 * exact):
        layer.weight.grad = grad.clone()
        assert float(Strategy("cpu").clip_grad_norm(layer, max_norm)) == pytest.approx(exact, rel=1e-7)
        assert torch.equal(layer.weight.grad, grad)
    layer.weight.grad = None
    assert float(Strategy("cpu").clip_grad_norm(layer, 1.0)) == 0.0  # no gradients: norm 0
