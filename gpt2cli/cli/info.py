"""`gpt2 info`: model size, FLOPs per token, KV-cache bytes and memory estimates for a spec."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer
from rich.table import Table

from gpt2cli.cli.common import (
    ConfigOpt,
    SetOpt,
    field_help,
    out,
    plural,
    print_json,
    print_wide,
)
from gpt2cli.errors import UserError
from gpt2cli.specs import ModelSpec, TrainSpec, build_spec

HELP = "Model size, FLOPs per token, KV-cache bytes and memory estimates for a spec."
DEFAULT_PRESET = "gpt2"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("info", help=HELP)(info)


def _model_opt(field: str, *names: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=field_help(ModelSpec, field), show_default=False, **kwargs)


def info(
    preset: Annotated[str | None, _model_opt("preset", "--preset", "-p")] = None,
    attn: Annotated[str | None, _model_opt("attn", "--attn")] = None,
    kv_heads: Annotated[int | None, _model_opt("n_kv_head", "--kv-heads")] = None,
    pos: Annotated[str | None, _model_opt("pos", "--pos")] = None,
    rope_base: Annotated[float | None, _model_opt("rope_base", "--rope-base")] = None,
    rope_learnable: Annotated[
        bool | None, _model_opt("rope_learnable", "--rope-learnable/--no-rope-learnable")
    ] = None,
    n_layer: Annotated[int | None, _model_opt("n_layer", "--n-layer")] = None,
    n_head: Annotated[int | None, _model_opt("n_head", "--n-head")] = None,
    n_embd: Annotated[int | None, _model_opt("n_embd", "--n-embd")] = None,
    block_size: Annotated[int | None, _model_opt("block_size", "--block-size")] = None,
    vocab_size: Annotated[int | None, _model_opt("vocab_size", "--vocab-size")] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Sequence length for FLOPs and activations; default: the "
            "config's train.seq_len, else block_size.",
            show_default=False,
        ),
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            "--world-size",
            "-w",
            help="Processes sharing the training; default: the config's parallel settings, else 1.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.table,
) -> None:
    """Model size, FLOPs per token, KV-cache bytes and memory estimates for a spec.

    Without --preset or a config file the model is GPT-2 124M. A --config file is read as a
    training spec (its model section, train.seq_len and parallel settings count).
    """
    model_flags = {
        "attn": attn,
        "n_kv_head": kv_heads,
        "pos": pos,
        "rope_base": rope_base,
        "rope_learnable": rope_learnable,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "block_size": block_size,
        "vocab_size": vocab_size,
        # Without a file, the size starts from GPT-2 124M; a file keeps its own meaning
        # (its model section without a preset means what `gpt2 train` makes of it).
        "preset": preset if preset is not None or config else DEFAULT_PRESET,
    }
    # A training spec, so that a config file written for `gpt2 train` means the same here.
    # Errors name the flag that was typed: --attn, not model.attn.
    flag_names = {f"model.{name}": "--kv-heads" if name == "n_kv_head" else "--" + name.replace("_", "-")
                  for name in model_flags}
    spec = build_spec(TrainSpec, config_file=config, flags={"model": model_flags}, sets=set_ or (),
                      flag_names=flag_names)
    if seq_len is None:
        seq_len = spec.seq_len
    if world_size is None:
        world_size = spec.parallel.procs_per_node * spec.parallel.nnodes
    # Checked here as well as in model_stats, to fail before the slow torch import.
    if not 0 < seq_len <= spec.model.block_size:
        raise UserError(
            f"--seq-len {seq_len} must be between 1 and block_size ({spec.model.block_size})",
            "lower --seq-len or raise --block-size" if seq_len > 0 else "pass --seq-len 1 or more",
        )
    if world_size < 1:
        raise UserError(
            f"--world-size must be at least 1, got {world_size}", "pass --world-size 1 or more"
        )

    from gpt2cli.modelinfo import model_stats  # imports torch: only now, so --help stays fast

    stats = model_stats(spec.model, seq_len=seq_len, world_size=world_size)
    if output_format is OutputFormat.json:
        print_json({**stats, "model": spec.model.model_dump()})
    else:
        _print_tables(spec.model, stats)


# ------------------------------------------------------------------------------------- output


def _print_tables(model: ModelSpec, stats: dict[str, Any]) -> None:
    name = model.preset or "custom"
    kv = stats["kv_cache_bytes_per_token"]
    kv_mha = stats["kv_cache_bytes_per_token_mha"]
    context = f"block_size {model.block_size}, vocab {model.vocab_size}"
    if model.pos == "rope":
        context = (
            f"base {model.rope_base:g}{', learnable' if model.rope_learnable else ''}; {context}"
        )

    summary = Table(
        title=f"{name}: {model.n_layer} layers, {model.n_head} heads, n_embd {model.n_embd}",
        show_header=False,
        title_justify="left",
    )
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column()
    summary.add_row("attention", f"{model.attn}", f"{plural(model.kv_heads, 'kv head')}, head size {model.head_dim}")
    summary.add_row("positions", model.pos, context)
    summary.add_row("parameters", f"{stats['params']:,}", _count(stats["params"]))
    summary.add_row(
        "non-embedding",
        f"{stats['non_embedding_params']:,}",
        f"{_count(stats['non_embedding_params'])}, without wte and wpe",
    )
    # The N of 6N is its own row: it is neither of the two counts above (see gpt2cli.modelinfo).
    summary.add_row(
        "N of 6N", f"{stats['flops_params']:,}", f"{_count(stats['flops_params'])}, without wpe"
    )
    summary.add_row(
        "training FLOPs/token",
        f"{stats['flops_per_token']:,}",
        f"{_flops(stats['flops_per_token'])} at T = {stats['seq_len']} (6N + 12·L·T·d)",
    )
    saving = (
        "" if kv["bf16"] == kv_mha["bf16"] else f", {kv_mha['bf16'] / kv['bf16']:g}x less than MHA"
    )
    summary.add_row("KV cache/token fp32", f"{kv['fp32']:,} B", _bytes(kv["fp32"]))
    summary.add_row("KV cache/token bf16", f"{kv['bf16']:,} B", _bytes(kv["bf16"]) + saving)
    out.print(summary)

    memory = stats["memory"]
    table = Table(
        title=f"Training memory per process (batch {memory['batch_size']}, seq_len {stats['seq_len']}, "
        f"world size {memory['world_size']}; {memory['assumptions']})",
        title_justify="left",
    )
    table.add_column("")
    for strategy in ("single", "ddp", "fsdp"):
        table.add_column(strategy, justify="right")
    for part in ("params", "grads", "optimizer", "buffers", "activations", "total"):
        table.add_row(
            part,
            *(_bytes(memory[s][part]) for s in ("single", "ddp", "fsdp")),
            style="bold" if part == "total" else None,
        )
    print_wide(table)


def _count(n: float) -> str:
    """A parameter count as ML papers write it: 124.44M, 1.56B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _flops(n: float) -> str:
    """FLOPs with SI prefixes, as GFLOP/s are written: 855.17M, 10.28G."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
