"""`gpt2 eval`: Score checkpoints: loss, perplexity and bits per byte on the same token windows.

Every checkpoint is scored on the same windows (:mod:`gpt2cli.evaluate`: the split's first
``tokens // seq_len`` non-overlapping windows, in order), so the rows of one table compare like
with like. All checkpoints are loaded (on CPU) and checked before any is scored, so a bad third
argument fails at once rather than after minutes of work.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2cli.cli.common import PRECEDENCE_HELP, ConfigOpt, SetOpt, field_help, out, print_json
from gpt2cli.errors import UserError
from gpt2cli.specs import EvaluateSpec, build_spec

HELP = "Score checkpoints: loss, perplexity and bits per byte on the same token windows."
FLAG_FOR_FIELD = {
    "data": "--data", "split": "--split", "tokens": "--tokens", "batch_size": "--batch-size",
    "seq_len": "--seq-len", "device": "--device", "dtype": "--dtype", "format": "--format",
}


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP + " " + PRECEDENCE_HELP, no_args_is_help=True)(evaluate)


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
    spec = build_spec(EvaluateSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=FLAG_FOR_FIELD)
    report = evaluate_checkpoints(spec)
    if spec.format == "json":
        print_json(report)
    else:
        _print_table(report)


# ----------------------------------------------------------------------------- the workflow


@dataclass
class EvalRow:
    checkpoint: str  # as given
    source: str  # what it turned out to be
    params: int
    loss: float  # mean nats per target token
    perplexity: float
    bits_per_byte: float
    tokens: int
    tokens_per_s: float
    seconds: float


def evaluate_checkpoints(spec: EvaluateSpec) -> dict[str, Any]:
    """Score every checkpoint of ``spec`` on the same windows; returns the report (the JSON that
    ``--format json`` prints): data, split, seq_len, windows, tokens, bytes and one row per
    checkpoint."""
    import numpy as np
    import torch

    from gpt2cli.data import TokenFolder, default_data_dir
    from gpt2cli.evaluate import count_windows, evaluate_sums
    from gpt2cli.loading import load_model
    from gpt2cli.parallel.base import resolve_device
    from gpt2cli.tokenizer import token_byte_lengths
    from gpt2cli.train import autocast_context, resolve_dtype

    if not spec.checkpoints:
        raise UserError("no checkpoint to evaluate", "pass one or more checkpoints, run folders or GPT-2 folders")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    folder = TokenFolder(Path(spec.data) if spec.data else default_data_dir())
    tokens = folder.tokens(spec.split)

    models = [load_model(c, device="cpu") for c in spec.checkpoints]
    seq_len = spec.seq_len or min(m.spec.block_size for m in models)
    for name, m in zip(spec.checkpoints, models, strict=True):
        if seq_len > m.spec.block_size:
            raise UserError(
                f"--seq-len {seq_len} exceeds the context of {name!r} ({m.spec.block_size})",
                "use a --seq-len every model can take",
            )
    windows = count_windows(len(tokens), seq_len, spec.tokens)
    if windows == 0:
        raise UserError(
            f"split {spec.split!r} of {str(folder.path)!r} has {len(tokens):,} tokens, fewer than one window "
            f"of {seq_len + 1:,}",
            "use more data or a shorter --seq-len",
        )
    used = np.asarray(tokens[: windows * seq_len + 1])
    targets = used[1:]
    top = int(used.max())
    n_bytes = int(token_byte_lengths()[targets.astype(np.int64)].sum())
    for name, m in zip(spec.checkpoints, models, strict=True):
        if top >= m.spec.vocab_size:
            raise UserError(
                f"the data holds token id {top}, outside the vocabulary of {name!r} ({m.spec.vocab_size:,})",
                "evaluate on data made with the model's tokenizer",
            )

    rows: list[EvalRow] = []
    for name, loaded in zip(spec.checkpoints, models, strict=True):
        model = loaded.model.to(device)
        t0 = time.perf_counter()
        loss_sum, count = evaluate_sums(
            model, tokens, seq_len=seq_len, batch_size=spec.batch_size, max_tokens=spec.tokens,
            autocast=lambda: autocast_context(device, dtype),
        )
        seconds = time.perf_counter() - t0
        loaded.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise UserError(f"the loss of {name!r} is not finite ({loss})", "the weights hold NaN or inf")
        rows.append(EvalRow(
            checkpoint=name,
            source=loaded.source,
            params=sum(p.numel() for p in loaded.model.parameters()),
            loss=loss,
            perplexity=math.exp(loss) if loss < 700 else math.inf,
            bits_per_byte=loss_sum / math.log(2) / n_bytes if n_bytes else math.nan,
            tokens=int(count),
            tokens_per_s=count / seconds if seconds > 0 else 0.0,
            seconds=seconds,
        ))
    return {
        "data": str(folder.path),
        "split": spec.split,
        "seq_len": seq_len,
        "windows": windows,
        "tokens": windows * seq_len,
        "bytes": n_bytes,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "results": [asdict(r) for r in rows],
    }


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
