"""Hugging Face GPT-2 import/export, checked against transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2cli.errors import UserError
from gpt2cli.model import GPT
from gpt2cli.model.hf import export_hf, hf_config_to_spec, is_hf_gpt2_dir, load_hf_gpt2
from gpt2cli.specs import ModelSpec

transformers = pytest.importorskip("transformers")

VOCAB, BLOCK = 512, 32


def random_hf_model(seed: int = 0):
    """A tiny GPT2LMHeadModel with every tensor random (biases and LayerNorms too), so a
    transposed or misplaced tensor cannot hide behind zeros and ones."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)


def test_save_pretrained_folder_loads_with_equal_logits(hf_model, hf_dir, tokens):
    assert (hf_dir / "model.safetensors").is_file() and is_hf_gpt2_dir(hf_dir)
    ours = load_hf_gpt2(str(hf_dir))
    assert ours.spec.preset is None
    assert (ours.spec.n_layer, ours.spec.n_head, ours.spec.n_embd, ours.spec.block_size) == (
        2,
        4,
        32,
        BLOCK,
    )
    assert ours.lm_head.weight is ours.transformer.wte.weight
    diff = (our_logits(ours, tokens) - hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= 1e-5


def test_pytorch_model_bin_loads_with_equal_logits(hf_model, tmp_path, tokens):
    hf_model.config.save_pretrained(tmp_path)
    torch.save(
        hf_model.state_dict(), tmp_path / "pytorch_model.bin"
    )  # includes the tied lm_head.weight
    ours = load_hf_gpt2(str(tmp_path))
    assert (our_logits(ours, tokens) - hf_logits(hf_model, tokens)).abs().max().item() <= 1e-5


class _Payload:
    """Stands for anything a pickle could build (and run) besides tensors."""


def test_a_pickled_bin_with_objects_is_refused_without_advice_to_load_it_unsafely(hf_model, tmp_path):
    hf_model.config.save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "extra": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_hf_gpt2(str(tmp_path))
    line = info.value.render()
    assert "safe load refuses (nothing was executed)" in line and "model.safetensors" in line
    assert "weights_only=False" not in line and "\n" not in line


def test_openai_layout_without_prefix_and_with_mask_buffers_loads(hf_model, tmp_path, tokens):
    """The published checkpoints name tensors `h.0.attn.c_attn.weight` (no `transformer.`) and
    carry the causal-mask buffers `h.N.attn.bias` and `h.N.attn.masked_bias`."""
    from safetensors.torch import save_file

    state = {
        k.removeprefix("transformer."): v.clone()
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, BLOCK, BLOCK).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf_model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_hf_gpt2(str(tmp_path))
    assert (our_logits(ours, tokens) - hf_logits(hf_model, tokens)).abs().max().item() <= 1e-5


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokens):
    torch.manual_seed(0)
    ours = GPT(ModelSpec(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.1)
    export_hf(ours, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == BLOCK
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert (hf_logits(reloaded, tokens) - our_logits(ours, tokens)).abs().max().item() <= 1e-5
    # ... and back into ours.
    again = load_hf_gpt2(str(tmp_path / "export"))
    torch.testing.assert_close(our_logits(again, tokens), our_logits(ours, tokens), rtol=0, atol=0)


def test_export_sets_gpt2_special_tokens_when_the_vocabulary_has_them(tmp_path):
    with torch.device("meta"):
        model = GPT(ModelSpec(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model.to_empty(device="cpu")
    model.init_weights()
    config = json.loads((export_hf(model, tmp_path) / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256


@pytest.mark.parametrize(
    "fields", [{"pos": "rope"}, {"attn": "gqa", "n_kv_head": 2}, {"attn": "mqa"}, {"bias": False}]
)
def test_export_refuses_what_gpt2_cannot_hold(fields, tmp_path):
    model = GPT(
        ModelSpec(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=4, n_embd=32, **fields)
    )
    with pytest.raises(UserError, match="cannot be exported"):
        export_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 100}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unrepresentable_configs_are_refused_in_one_line(hf_dir, override, needle):
    config = {**json.loads((hf_dir / "config.json").read_text()), **override}
    with pytest.raises(UserError, match=needle) as info:
        hf_config_to_spec(config)
    assert "\n" not in info.value.render()


def test_config_maps_onto_a_spec():
    spec = hf_config_to_spec(
        {
            "model_type": "gpt2",
            "n_positions": 64,
            "n_embd": 48,
            "n_layer": 3,
            "n_head": 6,
            "vocab_size": 1000,
            "layer_norm_epsilon": 1e-6,
            "resid_pdrop": 0.1,
        }
    )
    assert (spec.block_size, spec.n_embd, spec.n_layer, spec.n_head, spec.vocab_size) == (
        64,
        48,
        3,
        6,
        1000,
    )
    assert spec.layer_norm_eps == 1e-6 and spec.dropout == 0.1
    assert spec.preset is None and spec.attn == "mha" and spec.pos == "learned"


def test_missing_weights_and_folders_are_user_errors(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf_gpt2(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_hf_gpt2(str(tmp_path / "no" / "such" / "folder"))


def test_hub_name_offline_and_not_cached_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named like the repository
    with pytest.raises(UserError, match="offline") as info:
        load_hf_gpt2("openai-community/gpt2")
    assert "local folder" in info.value.render() and "\n" not in info.value.render()


def test_the_spec_of_a_cached_hub_model_needs_its_config_only(monkeypatch, tmp_path, hf_dir):
    """`gpt2 train --init NAME` reads the model's shape first: from config.json, without the
    weights (gpt2-xl's are 6 GB); loading the model is what needs them."""
    import huggingface_hub.constants

    from gpt2cli.model.hf import hf_gpt2_spec

    revision = "0" * 40
    repo = tmp_path / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text((hf_dir / "config.json").read_text())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert hf_gpt2_spec("someone/tiny-gpt2").shape_fields() == hf_gpt2_spec(str(hf_dir)).shape_fields()
    with pytest.raises(UserError):
        load_hf_gpt2("someone/tiny-gpt2")
