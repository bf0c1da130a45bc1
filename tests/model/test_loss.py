"""The chunked output layer + cross-entropy equals the plain one: value and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2cli.model import GPT
from gpt2cli.model.loss import chunked_linear_cross_entropy
from gpt2cli.specs import ModelSpec


def plain(hidden, weight, targets, reduction="mean"):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 24, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_equal_the_plain_loss(chunk, reduction):
    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (24,))
    expected = plain(hidden, weight, targets, reduction)
    expected_grads = torch.autograd.grad(expected * 1.7, (hidden, weight))
    got = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, reduction=reduction)
    got_grads = torch.autograd.grad(got * 1.7, (hidden, weight))  # an upstream factor, as grad_accum gives
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_compiled_chunked_loss_equals_the_plain_loss():
    """The chunked loss under torch.compile (as `--compile --loss-chunk N` runs it): the autograd
    Function traces, and value and gradients stay those of the plain loss."""
    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (24,))
    expected = plain(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected * 1.7, (hidden, weight))
    compiled = torch.compile(chunked_linear_cross_entropy, fullgraph=True)
    got = compiled(hidden, weight, targets, chunk_tokens=10, reduction="mean")
    got_grads = torch.autograd.grad(got * 1.7, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_without_grad_only_the_value_is_computed():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        got = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=4, reduction="sum")
    assert not got.requires_grad
    torch.testing.assert_close(got, plain(hidden, weight, targets, "sum").detach())


def test_model_with_chunked_loss_has_the_plain_losss_gradients_tied_weights_included():
    spec = ModelSpec(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, attn="gqa", pos="rope",
                     n_kv_head=1)
    torch.manual_seed(0)
    model = GPT(spec)
    idx, targets = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        loss = model(idx, targets=targets, loss_chunk=chunk)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_arguments_are_refused():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(h, w, t, chunk_tokens=2, reduction="none")
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(h, w, t, chunk_tokens=0)
