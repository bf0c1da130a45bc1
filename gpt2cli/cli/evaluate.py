"""`gpt2 eval`: Score checkpoints: loss, perplexity and bits per byte on the same token windows,
or accuracy on HellaSwag or LAMBADA on the same examples (``--task hellaswag`` or ``lambada``:
:mod:`gpt2cli.downstream`).

Every checkpoint is scored on the same windows (:mod:`gpt2cli.evaluate`: the split's first
``tokens // seq_len`` non-overlapping windows, at least one, in order), so the rows of one table
compare like with like. All checkpoints are loaded (on CPU) and checked before any is scored, so a bad third
argument fails at once rather than after minutes of work.

The table's header line goes out before the first model is scored when stdout is a terminal (to a file
or a pipe it goes out with the table, so an interrupted run leaves no half a report there); while they
are scored, a terminal's stderr shows which model and how many of its windows are done. A model whose loss is not finite still
gets its row (NaN/inf as they are; null in JSON, which has no NaN), and then the command ends with one
``Error:`` line and exit 3, as training does on a non-finite loss.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any

import typer
from rich.markup import escape

from gpt2cli.cli.common import (
    FLAT_PRECEDENCE_HELP,
    ConfigOpt,
    err,
    field_help,
    flat_set_opt,
    out,
    plural,
    print_json,
    print_wide,
)
from gpt2cli.errors import NonFiniteLossError
from gpt2cli.specs import EvaluateSpec, build_spec

HELP = ("Score checkpoints: loss, perplexity and bits per byte on the same token windows, or accuracy on "
        "HellaSwag or LAMBADA (--task hellaswag, --task lambada).")
SetOpt = flat_set_opt("eval")
FLAG_FOR_FIELD = {
    "data": "--data", "split": "--split", "tokens": "--tokens", "batch_size": "--batch-size",
    "seq_len": "--seq-len", "device": "--device", "dtype": "--dtype", "format": "--format",
    "quantize": "--quantize", "task": "--task", "task_data": "--task-data", "examples": "--examples",
}


# The downstream tasks as the header line and the table show them: their name, how they are
# scored, and the result column between acc and examples (name, JSON key, format).
DOWNSTREAM_DISPLAY = {
    "hellaswag": ("HellaSwag", "completion style", ("acc_norm", "acc_norm", "{:.4f}")),
    "lambada": ("LAMBADA", "last word", ("ppl", "ppl", "{:,.2f}")),
}


class Task(str, Enum):
    loss = "loss"
    hellaswag = "hellaswag"
    lambada = "lambada"


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
    task: Annotated[Task | None, typer.Option("--task", help=_h("task"), show_default=False)] = None,
    task_data: Annotated[str | None, typer.Option("--task-data", help=_h("task_data"), show_default=False)] = None,
    examples: Annotated[int | None, typer.Option("--examples", help=_h("examples"), show_default=False)] = None,
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
    quantize: Annotated[str | None, typer.Option("--quantize", help=_h("quantize"), show_default=False)] = None,
    output_format: Annotated[OutputFormat | None, typer.Option("--format", help=_h("format"), show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags: dict[str, Any] = {
        "checkpoints": list(checkpoints) if checkpoints else None, "data": data, "split": split,
        "tokens": tokens, "batch_size": batch_size, "seq_len": seq_len, "device": device, "dtype": dtype,
        "quantize": quantize, "task": task.value if task else None, "task_data": task_data, "examples": examples,
        "format": output_format.value if output_format else None,
    }
    spec = build_spec(EvaluateSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=FLAG_FOR_FIELD,
                      set_prefix="eval")

    # Imported here: it imports torch, which flag errors do without.
    from gpt2cli.evaluate import evaluate_checkpoints

    data_name = DOWNSTREAM_DISPLAY[spec.task][0] if spec.task in DOWNSTREAM_DISPLAY else "data"
    with _ScoringDisplay(models=len(spec.checkpoints), header_on_stdout=spec.format == "table",
                         data_name=data_name) as display:
        report = evaluate_checkpoints(spec, progress=display)
    if spec.format == "json":
        print_json(report)  # a NaN/inf number is null there; the row's error says why
    else:
        if not out.is_terminal:  # a file or a pipe: the header goes with the table (see _ScoringDisplay)
            out.print(escape(_header_line(report)), soft_wrap=True)
        _print_table(report)
    failed = [r for r in report["results"] if r["error"]]
    if failed:  # every row is out first: the finished models' scores are kept, stdout stays whole
        raise _nonfinite_error(failed, len(report["results"]), report["dtype"], report["task"])


def _header_line(header: dict[str, Any]) -> str:
    if header["task"] in DOWNSTREAM_DISPLAY:
        title, how, _ = DOWNSTREAM_DISPLAY[header["task"]]
        return (
            f"{title} {header['data']}: {plural(header['examples'], 'example')}, {how} "
            f"({header['device']}, {header['dtype']}{', int8 weights' if header['quantize'] == 'int8' else ''})"
        )
    return (
        f"{header['data']}, split {header['split']}: {plural(header['windows'], 'window')} x "
        f"{plural(header['seq_len'], 'token')} = {plural(header['tokens'], 'token')}, "
        f"{plural(header['bytes'], 'byte')} ({header['device']}, {header['dtype']}"
        f"{', int8 weights' if header['quantize'] == 'int8' else ''})"
    )


class _ScoringDisplay:
    """gpt2cli.evaluate.EvalProgress for the terminal. The header line goes out before the first
    model is scored: on a terminal's stdout above the table, else on a terminal's stderr (JSON on
    stdout, or stdout a file or pipe, which gets its header with the table). While
    models are scored, a terminal's stderr shows a bar: which model of how many, and its windows
    done; it disappears before the table. Piped stderr gets nothing, as with `gpt2 data`."""

    def __init__(self, *, models: int, header_on_stdout: bool, data_name: str = "data") -> None:
        self.models = models
        self.header_on_stdout = header_on_stdout
        self.data_name = data_name  # what a download bar says it downloads
        self.progress: Any = None
        self.task: Any = None
        self.downloading: Any = None  # a bar while a task's data downloads (before start)

    def __enter__(self) -> _ScoringDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_download()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def download(self, done: int, total: int | None) -> None:
        if not err.is_terminal:
            return
        if self.downloading is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self.downloading = Progress(TextColumn(f"[bold]downloading[/] {self.data_name}"), BarColumn(), DownloadColumn(),
                                        TransferSpeedColumn(), console=err, transient=True)
            self.downloading.start()
            self.downloading.add_task("download", total=total)
        self.downloading.update(self.downloading.task_ids[0], completed=done, total=total)

    def _end_download(self) -> None:
        if self.downloading is not None:
            self.downloading.stop()
            self.downloading = None

    def start(self, header: dict[str, Any]) -> None:
        self._end_download()
        if self.header_on_stdout and out.is_terminal:
            out.print(escape(_header_line(header)), soft_wrap=True)
        elif err.is_terminal:
            err.print(escape(_header_line(header)), soft_wrap=True)
        if not err.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]scoring[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(header["unit"]), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=err, transient=True,
        )
        self.progress.start()

    def model(self, index: int, checkpoint: str, windows: int) -> None:
        if self.progress is None:
            return
        description = f"{index + 1}/{self.models} {escape(checkpoint)}" if self.models > 1 else escape(checkpoint)
        if self.task is not None:
            self.progress.remove_task(self.task)  # a fresh task: each model's own elapsed time and eta
        self.task = self.progress.add_task(description, total=windows)
        self.progress.refresh()  # show the model now, even if its windows take less than a refresh

    def windows_done(self, windows: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=windows)


def _nonfinite_error(failed: list[dict[str, Any]], rows: int, dtype: str, task: str) -> NonFiniteLossError:
    if task in DOWNSTREAM_DISPLAY:
        what = "; ".join(f"{r['checkpoint']!r}: {r['error']}" for r in failed)
    else:
        named = ", ".join(f"{r['checkpoint']!r} ({r['loss']})" for r in failed)
        what = f"the loss of {named} is not finite" if len(failed) == 1 else f"the losses of {named} are not finite"
    if rows > len(failed):
        what += "; the other rows are valid"
    cause = "its weights hold NaN or inf" if len(failed) == 1 else "their weights hold NaN or inf"
    if dtype == "float16":
        cause += ", or fp16 overflowed: try --dtype bf16 or fp32"
    return NonFiniteLossError(what, cause)


def _number(value: float, form: str) -> str:
    """``value`` in ``form``, or in scientific notation from a million up: the perplexity of a
    model far off can have hundreds of digits."""
    if math.isfinite(value) and abs(value) >= 1e6:
        return f"{value:.3e}"
    return form.format(value)


def _print_table(report: dict[str, Any]) -> None:
    """The results table (its header line went out before the scoring, see _ScoringDisplay)."""
    from rich.table import Table

    if report["task"] in DOWNSTREAM_DISPLAY:
        _, _, (column, key, form) = DOWNSTREAM_DISPLAY[report["task"]]
        columns = ("checkpoint", "params", "acc", column, "examples", "truncated", "examples/s")
        cells = [
            (f"{r['params']:,}", f"{r['acc']:.4f}", _number(r[key], form), f"{r['examples']:,}",
             f"{r['truncated']:,}", f"{r['examples_per_s']:,.1f}")
            for r in report["results"]
        ]
    else:
        columns = ("checkpoint", "params", "loss", "ppl", "bits/byte", "tokens", "tokens/s")
        cells = [
            (f"{r['params']:,}", f"{r['loss']:.4f}", _number(r["perplexity"], "{:.2f}"), f"{r['bits_per_byte']:.4f}",
             f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}")
            for r in report["results"]
        ]
    table = Table()
    for col in columns:
        if col == "checkpoint":
            table.add_column(col, overflow="fold")  # whole paths, wrapped rather than cut
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r, row_cells in zip(report["results"], cells, strict=True):
        # a NaN/inf shows as nan/inf, in red: honest, and not mistaken for a score
        table.add_row(escape(r["checkpoint"]), *row_cells, style="red" if r["error"] else None)
    print_wide(table, out)  # piped or redirected: whole paths on one line each, however wide
