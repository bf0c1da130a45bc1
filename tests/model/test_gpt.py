"""The GPT module: GPT-2 names and initialisation, tying, causality, meta-device init, training."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2cli.model import GPT
from gpt2cli.model.rope import rope_inv_freq
from gpt2cli.specs import ModelSpec

VARIANTS = [(attn, pos) for attn in ("mha", "gqa", "mqa") for pos in ("learned", "rope")]


def tiny_spec(**fields) -> ModelSpec:
    base = {"vocab_size": 512, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}
    if fields.get("attn") == "gqa":
        base["n_kv_head"] = 2
    return ModelSpec(**{**base, **fields})


def tiny_model(seed: int = 0, **fields) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_spec(**fields)).eval()


def test_parameter_names_are_gpt2s():
    model = tiny_model(n_layer=1)
    block = [
        f"transformer.h.0.{name}.{kind}"
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for kind in ("weight", "bias")
    ]
    expected = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
        *block,
    }
    assert set(model.state_dict()) == expected


def test_output_layer_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
    )


def test_num_params_counts_tied_weight_once_and_can_skip_positions():
    spec = tiny_spec()
    model = GPT(spec)
    C, V, L = spec.n_embd, spec.vocab_size, spec.n_layer
    per_block = (
        2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    )
    expected = V * C + spec.block_size * C + L * per_block + 2 * C
    assert model.num_params() == expected
    assert model.num_params(exclude_position_embeddings=True) == expected - spec.block_size * C


def test_gpt2_initialisation():
    torch.manual_seed(0)
    spec = tiny_spec(n_embd=64, n_layer=2)
    model = GPT(spec)
    residual_std = 0.02 / math.sqrt(2 * spec.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0
        assert torch.equal(block.ln_1.weight, torch.ones(spec.n_embd))
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_meta_device_model_materialises_with_init_weights(pos):
    spec = tiny_spec(pos=pos)
    with torch.device("meta"):
        model = GPT(spec)
    assert model.transformer.wte.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.transformer.wte.weight  # to_empty unties; init re-ties
    if pos == "rope":
        assert torch.equal(model.rope.inv_freq, rope_inv_freq(spec.head_dim, spec.rope_base))
    logits = model(torch.randint(0, spec.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, spec.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn,pos", VARIANTS)
def test_causality(attn, pos):
    """Logits at position t depend on tokens 0..t only."""
    model = tiny_model(attn=attn, pos=pos)
    idx = torch.randint(0, 512, (2, 16))
    changed = idx.clone()
    t = 9
    changed[:, t + 1 :] = torch.randint(0, 512, (2, 16 - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_sequence_longer_than_block_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_dropout_acts_only_in_training_mode():
    model = tiny_model(dropout=0.5)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_last_only_gives_the_last_positions_logits():
    """What a prefill needs: the output layer for the last position only, same values."""
    model = tiny_model().eval()
    idx = torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        full, last = model(idx), model(idx, last_only=True)
    assert last.shape == (3, 1, model.spec.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_logits_at_gives_those_positions_logits(pos):
    """What multiple-choice scoring needs: the output layer at chosen (row, position) pairs only."""
    model = tiny_model(pos=pos).eval()
    idx = torch.randint(0, 512, (3, 10))
    rows, positions = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([9, 3, 0, 5, 5])
    with torch.no_grad():
        full, some = model(idx), model(idx, logits_at=(rows, positions))
    assert some.shape == (5, model.spec.vocab_size)
    torch.testing.assert_close(some, full[rows, positions], rtol=0, atol=1e-6)


def test_forward_with_targets_returns_the_cross_entropy_of_its_logits():
    model = tiny_model().eval()
    idx, targets = torch.randint(0, 512, (3, 10)), torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        logits = model(idx)
        mean = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        torch.testing.assert_close(model(idx, targets=targets), mean)
        torch.testing.assert_close(model(idx, targets=targets, reduction="sum"), total)
    assert model(idx, targets=targets).dtype == torch.float32 and model(idx, targets=targets).dim() == 0


@pytest.mark.parametrize("attn,pos", [*VARIANTS, ("gqa", "rope_learnable")])
def test_every_variant_learns(attn, pos):
    """A few AdamW steps on one batch lower the loss (gradients reach every parameter)."""
    fields = {"pos": "rope", "rope_learnable": True} if pos == "rope_learnable" else {"pos": pos}
    model = tiny_model(attn=attn, **fields).train()
    idx = torch.randint(0, 512, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_model_package_imports_only_torch_and_specs():
    """The model stays free of parallelism, CLI, data and checkpoint code (and of transformers)."""
    allowed_roots = {
        "__future__",
        "torch",
        "gpt2cli",
        "math",
        "json",
        "os",
        "re",
        "shutil",  # hf.py: removes an export's staging folder when it fails
        "pathlib",
        "typing",
        "safetensors",
        "huggingface_hub",
    }
    allowed_gpt2cli = {"gpt2cli.specs", "gpt2cli.errors", "gpt2cli.model", "gpt2cli.fsutil"}  # fsutil: no torch
    package = Path(__file__).resolve().parents[2] / "gpt2cli" / "model"
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            for name in names:
                assert not name.startswith("torch.distributed"), f"{file.name} imports {name}"
                assert name.split(".")[0] in allowed_roots, f"{file.name} imports {name}"
                if name.startswith("gpt2cli"):
                    assert any(name == a or name.startswith(a + ".") for a in allowed_gpt2cli), (
                        f"{file.name}: {name}"
                    )
