"""gpt2cli.quantize: int8 weight-only linear layers, and `--quantize int8` in generate and eval."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.generate import Generator
from gpt2cli.quantize import Int8Linear, quantize_int8, quantize_per_row, weight_bytes
from gpt2cli.specs import GenerateSpec
from tests.test_evaluate_cli import checkpoints, data_dir  # noqa: F401
from tests.test_generate import ckpt, cli, one_error_line, one_thread, random_model, tiny_gpt2  # noqa: F401


def test_per_row_values_are_within_half_a_step_of_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different sizes
    weight[5] = 0.0
    values, scales = quantize_per_row(weight)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (64,)
    assert values.abs().max() <= 127
    assert torch.equal(values.abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), 127, dtype=torch.int8))
    error = (values.float() * scales.unsqueeze(1) - weight).abs()
    assert (error <= scales.unsqueeze(1) / 2 * (1 + 1e-6)).all()
    assert scales[5] == 1.0 and not values[5].any()  # an all-zero row: no division by zero


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_multiplies_by_the_weight_its_values_stand_for(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, bias=bias)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, q.weight, linear.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)
    assert (q.weight - linear.weight).abs().max() <= q.scales.max() / 2 * (1 + 1e-6)
    assert dict(q.named_parameters()) == {}  # nothing left to train
    assert q.weight_int8.dtype == torch.int8 and q.scales.dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_eager_blockwise_decode_product_equals_the_whole_weight_product(rows, monkeypatch):
    """Up to 8 rows on the CPU take the block-by-block dequantization (a block size that does not
    divide the output rows, here); more rows F.linear with the whole weight: the same numbers."""
    import gpt2cli.quantize as quantize

    monkeypatch.setattr(quantize, "DEQUANTIZE_BLOCK", 7)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(32, 50))
    x = torch.randn(rows, 1, 32)
    calls = []
    monkeypatch.setattr(q, "_blockwise_product", lambda x, f=q._blockwise_product: calls.append(1) or f(x))
    torch.testing.assert_close(q(x), F.linear(x, q.weight, q.bias), rtol=1e-5, atol=1e-6)
    assert bool(calls) == (rows <= 8)


def test_a_compiled_single_row_equals_the_eager_product():
    """One row on the CPU takes the fused multiply-and-sum under torch.compile; same numbers as F.linear."""
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 96))
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    x = torch.randn(1, 1, 64)
    torch.testing.assert_close(compiled(x), q(x), rtol=1e-5, atol=1e-5)


def test_quantizing_a_model_replaces_every_linear_and_keeps_its_outputs_close():
    model = random_model("gqa", "rope", std=0.05)
    quantized = copy.deepcopy(model)
    replaced = quantize_int8(quantized)
    assert replaced == 4 * model.spec.n_layer + 1  # qkv, attention out, MLP in and out per block; output layer
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    # The output layer got an int8 copy; the token embedding is still the float parameter.
    assert torch.equal(quantized.transformer.wte.weight, model.transformer.wte.weight)
    assert isinstance(quantized.lm_head, Int8Linear)
    x = torch.randint(0, model.spec.vocab_size, (2, 16))
    with torch.no_grad():
        full, approx = model(x), quantized(x)
        assert ((approx - full).norm() / full.norm()) < 0.02
        # The chunked loss multiplies by the output layer's weight: the dequantized one.
        chunked = quantized(x, targets=x, loss_chunk=8)
        torch.testing.assert_close(chunked, quantized(x, targets=x), rtol=1e-5, atol=1e-5)
    # Linear weights take a byte per value: the blocks' weights shrink fourfold.
    blocks = [b for b in (model.transformer.h, quantized.transformer.h)]
    assert weight_bytes(blocks[1]) < 0.3 * weight_bytes(blocks[0])


def test_int8_generation_compiled_samples_like_eager_and_bf16_keeps_int8_weights():
    spec = GenerateSpec(max_new_tokens=12, temperature=0, ignore_eos=True)
    model = random_model()
    eager = Generator(copy.deepcopy(model), device="cpu", dtype="fp32", quantize="int8").generate([1, 2, 3], spec)
    compiled = Generator(copy.deepcopy(model), device="cpu", dtype="fp32", quantize="int8", compile=True)
    result = compiled.generate([1, 2, 3], spec)
    assert result.samples[0].tokens == eager.samples[0].tokens
    assert result.quantize == "int8" and eager.quantize == "int8"
    bf16 = Generator(copy.deepcopy(model), device="cpu", dtype="bf16", quantize="int8")
    assert bf16.model.lm_head.weight_int8.dtype == torch.int8 and bf16.model.lm_head.scales.dtype == torch.bfloat16
    assert bf16.num_params == model.num_params()
    with pytest.raises(ValueError, match="quantize"):
        Generator(copy.deepcopy(model), device="cpu", quantize="int4")


def test_cli_generate_quantized_says_so_and_a_bad_value_is_one_line(ckpt, capsys):  # noqa: F811 (fixture)
    code, out, err = cli(capsys, "generate", ckpt, "Hello", "-n", 5, "--temperature", 0, "--quantize", "int8", "-v")
    assert code in (0, None), err
    assert "int8 weights" in err and "(linear layers int8)" in err
    assert "warning: --quantize int8 without --compile" in err
    code, _, err = cli(capsys, "generate", ckpt, "Hello", "--quantize", "int4")
    assert "--quantize" in one_error_line(code, err)


def test_cli_warns_where_int8_decodes_slower_than_float_weights():
    from gpt2cli.cli.generate import _slow_int8_reason

    assert _slow_int8_reason(GenerateSpec(quantize="none"), "cpu") is None
    assert "add --compile" in _slow_int8_reason(GenerateSpec(quantize="int8"), "cuda")
    assert _slow_int8_reason(GenerateSpec(quantize="int8", compile=True), "cpu") is None
    assert "several samples" in _slow_int8_reason(GenerateSpec(quantize="int8", compile=True, num_samples=2), "cpu")
    assert _slow_int8_reason(GenerateSpec(quantize="int8", compile=True, num_samples=2), "cuda") is None


def test_cli_eval_reports_what_int8_costs_in_loss(checkpoints, data_dir, capsys):  # noqa: F811 (fixtures)
    args = ["eval", checkpoints[0], "--data", data_dir, "--tokens", 512, "--format", "json"]
    code, out, err = cli(capsys, *args)
    assert code in (0, None), err
    full = json.loads(out)
    code, out, err = cli(capsys, *args, "--quantize", "int8")
    assert code in (0, None), err
    quantized = json.loads(out)
    assert full["quantize"] == "none" and quantized["quantize"] == "int8"
    a, b = full["results"][0], quantized["results"][0]
    assert a["params"] == b["params"] and a["tokens"] == b["tokens"]
    assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 0.01 * a["loss"]
