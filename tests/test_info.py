"""`gpt2 info` and the numbers behind it (gpt2cli.modelinfo)."""

from __future__ import annotations

import json

import pytest

from gpt2cli.errors import UserError
from gpt2cli.modelinfo import model_stats
from gpt2cli.specs import ModelSpec
from tests.conftest import run_gpt2

GPT2 = ModelSpec(preset="gpt2")


def test_gpt2_numbers():
    stats = model_stats(GPT2)
    assert stats["params"] == 124_439_808
    assert stats["non_embedding_params"] == 124_439_808 - 50257 * 768 - 1024 * 768
    n = 124_439_808 - 1024 * 768  # parameters without position embeddings
    assert stats["flops_per_token"] == 6 * n + 12 * 12 * 1024 * 768 == 855_166_464
    assert stats["kv_cache_bytes_per_token"] == {
        "fp32": 2 * 12 * 12 * 64 * 4,
        "bf16": 2 * 12 * 12 * 64 * 2,
    }


def test_flops_scale_with_sequence_length():
    short, long = model_stats(GPT2, seq_len=256), model_stats(GPT2, seq_len=1024)
    assert long["flops_per_token"] - short["flops_per_token"] == 12 * 12 * (1024 - 256) * 768


@pytest.mark.parametrize("attn,kv_heads", [("gqa", 4), ("gqa", 2), ("mqa", 1)])
def test_kv_cache_shrinks_with_the_number_of_kv_heads(attn, kv_heads):
    stats = model_stats(
        ModelSpec(preset="gpt2", attn=attn, n_kv_head=kv_heads if attn == "gqa" else None)
    )
    mha = model_stats(GPT2)["kv_cache_bytes_per_token"]
    for dtype in ("fp32", "bf16"):
        assert stats["kv_cache_bytes_per_token"][dtype] * 12 == mha[dtype] * kv_heads
        assert stats["kv_cache_bytes_per_token_mha"][dtype] == mha[dtype]


def test_fsdp_shards_the_training_state_by_world_size():
    memory = model_stats(ModelSpec(preset="gpt2-xl"), world_size=8)["memory"]
    single, ddp, fsdp = memory["single"], memory["ddp"], memory["fsdp"]
    params = 1_557_611_200
    assert single["params"] == single["grads"] == 4 * params and single["optimizer"] == 8 * params
    assert ddp["total"] > single["total"]  # gradient buckets
    assert fsdp["params"] == 4 * params // 8 and fsdp["optimizer"] == 8 * params // 8
    assert fsdp["activations"] == single["activations"]
    assert fsdp["total"] < single["total"] / 3
    for strategy in (single, ddp, fsdp):
        assert strategy["total"] == sum(v for k, v in strategy.items() if k != "total")


def test_bad_sequence_length_is_a_user_error():
    with pytest.raises(UserError, match="block_size"):
        model_stats(GPT2, seq_len=2048)


# ----------------------------------------------------------------------- the installed command


def test_info_json_is_one_object_with_the_documented_keys():
    proc = run_gpt2("info", "--format", "json", check=True)
    stats = json.loads(proc.stdout)
    assert {"params", "non_embedding_params", "flops_per_token", "kv_cache_bytes_per_token"} <= set(
        stats
    )
    assert stats["params"] == 124_439_808  # gpt2 is the default preset
    assert stats["model"]["preset"] == "gpt2"


def test_info_table_with_model_flags():
    proc = run_gpt2(
        "info",
        "--preset",
        "tiny",
        "--attn",
        "gqa",
        "--kv-heads",
        "2",
        "--pos",
        "rope",
        "--world-size",
        "2",
        "--seq-len",
        "32",
        check=True,
    )
    out = proc.stdout
    for text in ("parameters", "KV cache", "gqa", "rope", "single", "ddp", "fsdp", "total"):
        assert text in out
    stats = model_stats(ModelSpec(preset="tiny", attn="gqa", n_kv_head=2, pos="rope"))
    assert f"{stats['params']:,}" in out


def test_info_reads_a_config_file_and_set_wins(tmp_path, capsys):
    """In-process (the subprocess tests above cover the installed command): a training config
    file is read, flags override it and --set overrides the flags."""
    from gpt2cli.cli import main

    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "gpt2"\nn_layer = 6\n\n[train]\nseq_len = 512\n')
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "info",
                "--config",
                str(config),
                "--n-layer",
                "4",
                "--set",
                "model.n_layer=2",
                "--format",
                "json",
            ]
        )
    assert exit_info.value.code == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["model"]["n_layer"] == 2 and stats["seq_len"] == 512
    assert stats["params"] == model_stats(ModelSpec(preset="gpt2", n_layer=2))["params"]


@pytest.mark.parametrize("args", [("--n-head", "5"), ("--seq-len", "4096"), ("--attn", "xqa")])
def test_bad_input_is_one_error_line_and_exit_2(args):
    proc = run_gpt2("info", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    assert "Traceback" not in proc.stderr


def test_a_sequence_length_out_of_range_gets_the_hint_for_its_side():
    too_long = run_gpt2("info", "--preset", "tiny", "--seq-len", "65").stderr
    too_short = run_gpt2("info", "--preset", "tiny", "--seq-len", "0").stderr
    assert "(lower --seq-len or raise --block-size)" in too_long
    assert "(pass --seq-len 1 or more)" in too_short


def test_flops_n_is_the_parameters_without_position_embeddings():
    """The N of 6N is reported (flops_params) and is what flops_per_token uses: every parameter
    but the position embeddings (none with RoPE), neither `params` nor the non-embedding count."""
    for spec in (GPT2, ModelSpec(preset="gpt2", pos="rope")):
        stats = model_stats(spec, seq_len=256)
        wpe = spec.block_size * spec.n_embd if spec.pos == "learned" else 0
        assert stats["flops_params"] == stats["params"] - wpe
        assert stats["flops_per_token"] == 6 * stats["flops_params"] + 12 * spec.n_layer * 256 * spec.n_embd


def test_info_table_wording_and_units():
    """'1 kv head' (singular), billions as B, and the N of 6N in its own row, equal to the
    JSON's flops_params."""
    proc = run_gpt2("info", "--preset", "gpt2-xl", "--attn", "mqa", check=True)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in proc.stdout.splitlines() if line.startswith("│")}
    assert rows["attention"] == ["mqa", "1 kv head, head size 64"]
    stats = model_stats(ModelSpec(preset="gpt2-xl", attn="mqa"))
    assert rows["parameters"] == [f"{stats['params']:,}", f"{stats['params'] / 1e9:.2f}B"]
    assert rows["parameters"][1].endswith("B") and "G" not in rows["parameters"][1]
    assert rows["N of 6N"] == [f"{stats['flops_params']:,}", f"{stats['flops_params'] / 1e9:.2f}B, without wpe"]
    assert rows["training FLOPs/token"][1].endswith("at T = 1024 (6N + 12·L·T·d)")

    gqa = run_gpt2("info", "--preset", "tiny", "--attn", "gqa", "--kv-heads", "2", check=True).stdout
    assert "2 kv heads, head size 16" in gqa
