"""gpt2cli.cpu_decoding: CPU weight layouts keep every value, name and tie, and give the same
results as plain nn.Linear; the generator packs weights for batches of 2+ rows only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2cli.cpu_decoding import (
    PackedLinear,
    lay_out_weights_for_decoding,
    mkl_packing_available,
    pack_linears,
)
from gpt2cli.generate import Generator
from gpt2cli.specs import GenerateSpec
from tests.test_generate import one_thread, random_model, tiny_gpt2  # noqa: F401 (fixture)

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL's packed GEMM")


@pytest.mark.parametrize("make", [random_model, tiny_gpt2], ids=["small", "huge-page-mapping"])
def test_weights_laid_out_transposed_keep_values_and_the_tied_output_layer(make):
    """Every matrix is re-laid column-major (BLAS's plain kernel for x @ W.T) without changing a
    value or untying the output layer from the token embedding."""
    model = make()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lay_out_weights_for_decoding(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        if p.dim() == 2:
            assert p.stride() == (1, p.shape[0]), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_int8_weights_join_the_mapping_row_major_with_their_values():
    from gpt2cli.quantize import Int8Linear, quantize_int8

    model = tiny_gpt2()
    quantize_int8(model)
    int8 = {name: m.weight_int8.clone() for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    mapping = lay_out_weights_for_decoding(model)
    assert mapping is not None
    start = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.weight_int8, int8[name]) and m.weight_int8.is_contiguous(), name
            assert start <= m.weight_int8.data_ptr() < start + len(mapping), name


@needs_mkl
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "column-major"])
def test_packed_linear_computes_what_nn_linear_computes(bias, transposed):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    if transposed:
        linear.weight.data = linear.weight.data.t().contiguous().t()
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    x = torch.randn(2, 3, 48)
    with torch.inference_mode():
        assert torch.equal(packed(x), linear(x))  # nothing packed: F.linear itself
        packed.pack(6)
        assert "packed for 6 rows" in repr(packed)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)  # 6 rows: packed kernel
        torch.testing.assert_close(packed(x[0]), linear(x[0]), rtol=1e-5, atol=1e-5)  # 2-D input
        assert torch.equal(packed(x[:1]), linear(x[:1]))  # 3 rows: falls back to F.linear
        packed.pack(None)
        assert packed.packed is None and torch.equal(packed(x), linear(x))


@needs_mkl
def test_pack_linears_keeps_names_values_tie_and_output():
    model = random_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 512, (4, 1))
    with torch.inference_mode():
        expected = model(idx)
    wrapped = pack_linears(model)
    n_linear = 1 + 4 * model.spec.n_layer  # the output layer + c_attn, c_proj, c_fc, mlp.c_proj
    assert len(wrapped) == n_linear and not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for linear in wrapped:
        linear.pack(4)
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_generator_packs_for_batches_of_two_or_more_and_decodes_the_same_tokens():
    """Greedy samples of a batch (packed weights) equal the one-sample run (unpacked), row by row;
    a batch of one drops the packed copies again."""
    gen = Generator(tiny_gpt2(), device="cpu", dtype="fp32")
    linears = [m for m in gen.model.modules() if isinstance(m, PackedLinear)]
    assert linears
    spec = GenerateSpec(max_new_tokens=20, temperature=0, ignore_eos=True)
    single = gen.generate("The quick brown fox", spec).samples[0].tokens
    assert all(m.packed is None for m in linears)
    batch = gen.generate("The quick brown fox", spec.model_copy(update={"num_samples": 3}))
    assert all(m.packed_rows == 3 for m in linears)
    assert [s.tokens for s in batch.samples] == [single] * 3
    gen.generate("The quick brown fox", spec)
    assert all(m.packed is None for m in linears)


def test_compiled_or_bf16_generators_keep_plain_linears():
    """Inductor cannot lower MKL's packed op, and the packed layout is fp32 only."""
    for kwargs in ({"dtype": "bf16"}, {"dtype": "fp32", "compile": True}):
        gen = Generator(random_model(), device="cpu", **kwargs)
        assert not any(isinstance(m, PackedLinear) for m in gen.model.modules())


@needs_mkl
def test_no_packed_copy_where_it_would_not_fit_in_half_the_available_memory(monkeypatch):
    import gpt2cli.cpu_decoding as cpu_decoding

    gen = Generator(random_model(), device="cpu", dtype="fp32")
    linears = [m for m in gen.model.modules() if isinstance(m, PackedLinear)]
    weight_bytes = sum(m.weight.numel() * 4 for m in linears)
    spec = GenerateSpec(max_new_tokens=3, temperature=0, num_samples=2)
    monkeypatch.setattr(cpu_decoding, "available_memory_bytes", lambda: 2 * weight_bytes - 1)
    gen.generate([1, 2, 3], spec)
    assert all(m.packed is None for m in linears)
    monkeypatch.setattr(cpu_decoding, "available_memory_bytes", lambda: 2 * weight_bytes)
    gen.generate([1, 2, 3], spec.model_copy(update={"num_samples": 3}))
    assert all(m.packed_rows == 3 for m in linears)


def test_available_memory_is_read_from_the_system():
    import sys

    from gpt2cli.cpu_decoding import available_memory_bytes

    available = available_memory_bytes()
    assert available is None or available > 0
    if sys.platform == "linux":  # /proc/meminfo's MemAvailable
        assert available is not None


def test_a_packed_model_stays_correct_after_its_weights_change_and_can_be_copied():
    """Generator wraps the caller's model: a weight changed in place afterwards (an optimizer step,
    load_state_dict) must not be served from a stale packed copy, gradients must flow, and the
    model must still deep-copy and pickle."""
    import copy
    import io

    from gpt2cli.generate import Generator
    from gpt2cli.model import GPT
    from gpt2cli.specs import GenerateSpec, ModelSpec

    if not mkl_packing_available():
        pytest.skip("no MKL packed GEMM in this torch build")
    model = GPT(ModelSpec(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    gen = Generator(model, device="cpu", dtype="fp32")
    gen.generate([1, 2, 3], GenerateSpec(max_new_tokens=3, num_samples=2, temperature=0))  # packs for 2 rows
    assert any(m.packed is not None for m in gen._packed_linears)
    idx = torch.randint(0, 256, (2, 1))
    reference = GPT(model.spec)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    reference.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), reference.eval()(idx))
    model.train()
    loss = model(torch.randint(0, 256, (2, 8)), targets=torch.randint(0, 256, (2, 8)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    assert all(m.packed is None for m in clone.modules() if hasattr(m, "packed"))


def test_learned_rope_frequencies_keep_their_fp32_values_through_a_bf16_cast():
    from gpt2cli.generate import Generator
    from gpt2cli.model import GPT
    from gpt2cli.specs import ModelSpec

    model = GPT(ModelSpec(vocab_size=256, block_size=1024, n_layer=1, n_head=2, n_embd=32, pos="rope",
                          rope_learnable=True))
    with torch.no_grad():
        model.rope.inv_freq.mul_(1.0123)  # trained away from the closed form
    before = model.rope.inv_freq.detach().clone()
    Generator(model, device="cpu", dtype="bf16")
    assert model.rope.inv_freq.dtype == torch.float32 and torch.equal(model.rope.inv_freq.detach(), before)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
