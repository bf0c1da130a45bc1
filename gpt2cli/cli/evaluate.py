"""`gpt2 eval`: Score checkpoints: loss, perplexity and bits per byte on the same token windows.

Every checkpoint is scored on the same windows (:mod:`gpt2cli.evaluate`: the split's first
``tokens // seq_len`` non-overlapping windows, at least one, in order), so the rows of one table
compare like with like. All checkpoints are loaded (on CPU) and checked before any is scored, so a bad third
argument fails at once rather than after minutes of work.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from gpt2cli.cli.common import (
    FLAT_PRECEDENCE_HELP,
    ConfigOpt,
    field_help,
    flat_set_opt,
    out,
    print_json,
)
from gpt2cli.specs import EvaluateSpec, build_spec

HELP = "Score checkpoints: loss, perplexity and bits per byte on the same token windows."
SetOpt = flat_set_opt("eval")
FLAG_FOR_FIELD = {
    "data": "--data", "split": "--split", "tokens": "--tokens", "batch_size": "--batch-size",
    "seq_len": "--seq-len", "device": "--device", "dtype": "--dtype", "format": "--format",
}


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP + " " + FLAT_PRECEDENCE_HELP, no_args_is_help=True)(evaluate)


def _h(field: str) -> str:
    return field_help(EvaluateSpec, field)


def evaluate(
    checkpoints: Annotated[
        list[str] | None,
        typer.Argument(metavar="CKPT", help=_h("checkpoints") + " Also safetensors exports and hub names.", show_default=False),
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help=_h("data"), show_default=False)] = None,
    split: Annotated[str | None, typer.Option("--split", help=_h("split"), show_default=False)] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help=_h("tokens"), show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help=_h("batch_size"), show_default=False)] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", help=_h("seq_len") + " With several models: the smallest block_size.", show_default=False),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help=_h("device"), show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help=_h("dtype") + " auto = bf16 autocast on CUDA, else fp32.", show_default=False)] = None,
    output_format: Annotated[OutputFormat | None, typer.Option("--format", help=_h("format"), show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags: dict[str, Any] = {
        "checkpoints": list(checkpoints) if checkpoints else None, "data": data, "split": split,
        "tokens": tokens, "batch_size": batch_size, "seq_len": seq_len, "device": device, "dtype": dtype,
        "format": output_format.value if output_format else None,
    }
    spec = build_spec(EvaluateSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=FLAG_FOR_FIELD,
                      set_prefix="eval")

    # Imported here: it imports torch, which flag errors do without.
    from gpt2cli.evaluate import evaluate_checkpoints

    report = evaluate_checkpoints(spec)
    if spec.format == "json":
        print_json(report)
    else:
        _print_table(report)


def _print_table(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    header = (
        f"{report['data']}, split {report['split']}: {report['windows']:,} windows x {report['seq_len']:,} tokens "
        f"= {report['tokens']:,} tokens, {report['bytes']:,} bytes ({report['device']}, {report['dtype']})"
    )
    table = Table()
    for col in ("checkpoint", "params", "loss", "ppl", "bits/byte", "tokens", "tokens/s"):
        if col == "checkpoint":
            table.add_column(col, overflow="fold")  # whole paths, wrapped rather than cut
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r in report["results"]:
        table.add_row(
            escape(r["checkpoint"]), f"{r['params']:,}", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}",
            f"{r['bits_per_byte']:.4f}", f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}",
        )
    console = out
    if not out.is_terminal:  # piped or redirected: whole paths on one line each, however wide
        from rich.console import Console

        console = Console(highlight=False, width=max(out.width, table.__rich_measure__(out, out.options).maximum))
    console.print(escape(header), soft_wrap=True)
    console.print(table)
