"""`gpt2 data`: turn a text corpus (files, folders, JSONL, parquet, HF datasets) into GPT-2 token files."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gpt2cli.cli.common import ConfigOpt, err, field_help, flat_set_opt, out, print_wide, si
from gpt2cli.errors import StoppedBySignal, UserError
from gpt2cli.specs import PrepareSpec, build_spec

if TYPE_CHECKING:
    from gpt2cli.data.prepare import PrepareProgress

# Stopped by a signal: the shell's convention, 128 + the signal number (130 and 143). There is
# nothing to resume, unlike `gpt2 train`'s 75.
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

HELP = "Turn a text corpus (files, folders, JSONL, parquet, HF datasets) into GPT-2 token files."
SetOpt = flat_set_opt("data")


class ErrorsMode(str, Enum):
    strict = "strict"
    replace = "replace"


def register(app: typer.Typer) -> None:
    app.command("data", help=HELP)(data)


def _opt(field: str, *names: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=field_help(PrepareSpec, field), show_default=False, **kwargs)


def data(
    sources: Annotated[
        list[str] | None,
        typer.Argument(help=field_help(PrepareSpec, "sources"), show_default=False, metavar="SOURCE"),
    ] = None,
    out_dir: Annotated[str | None, _opt("out", "--out", "-o")] = None,
    text_column: Annotated[str | None, _opt("text_column", "--text-column")] = None,
    subset: Annotated[str | None, _opt("subset", "--subset")] = None,
    split: Annotated[str | None, _opt("split", "--split")] = None,
    val_fraction: Annotated[float | None, _opt("val_fraction", "--val-fraction")] = None,
    max_docs: Annotated[int | None, _opt("max_docs", "--max-docs")] = None,
    max_tokens: Annotated[int | None, _opt("max_tokens", "--max-tokens")] = None,
    num_proc: Annotated[int | None, _opt("num_proc", "--num-proc", "-j")] = None,
    errors: Annotated[ErrorsMode | None, _opt("errors", "--errors")] = None,
    overwrite: Annotated[bool, _opt("overwrite", "--overwrite")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check prepared folders (the SOURCE arguments) instead of preparing: every token is "
        "read and hashed against meta.json's fingerprint, and ids outside the vocabulary are counted.",
    )] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Turn a text corpus into GPT-2 token files (train.bin, val.bin, meta.json).

    Examples: `gpt2 data` (the embedded tiny Shakespeare), `gpt2 data books/ notes/*.md`,
    `gpt2 data dump.jsonl --text-column content --out data/dump`,
    `gpt2 data HuggingFaceFW/fineweb-edu --subset sample-10BT --max-tokens 100000000`.
    """
    if verify:
        preparing = {"--out": out_dir, "--text-column": text_column, "--subset": subset, "--split": split,
                     "--val-fraction": val_fraction, "--max-docs": max_docs, "--max-tokens": max_tokens,
                     "--num-proc": num_proc, "--errors": errors, "--overwrite": overwrite or None,
                     "--config": config, "--set": set_}
        given = [flag for flag, value in preparing.items() if value is not None]
        if given:
            one = len(given) == 1
            raise UserError(f"--verify checks prepared folders; {', '.join(given)} {'is' if one else 'are'} for "
                            "preparing one", f"drop {'it' if one else 'them'}")
        if not sources:
            raise UserError("--verify needs the folders to check", "gpt2 data --verify DIR [DIR...]")
        _verify(sources, progress=not quiet)
        return
    flags = {
        "sources": list(sources) if sources else None,
        "out": out_dir,
        "text_column": text_column,
        "subset": subset,
        "split": split,
        "val_fraction": val_fraction,
        "max_docs": max_docs,
        "max_tokens": max_tokens,
        "num_proc": num_proc,
        "errors": errors.value if errors is not None else None,
        "overwrite": True if overwrite else None,  # absent: a config file's value stands
    }
    flag_names = {name: "--" + name.replace("_", "-") for name in flags if name != "sources"}
    flag_names["out"] = "--out"
    spec = build_spec(PrepareSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=flag_names,
                      set_prefix="data")

    from gpt2cli.data.prepare import prepare_data

    started = time.perf_counter()
    try:
        with _sigterm_raises(), _ProgressDisplay(enabled=not quiet, total_tokens=spec.max_tokens) as display:
            folder = prepare_data(spec, progress=display.update)
    except (_Terminated, KeyboardInterrupt) as exc:
        # prepare_data has removed its staging folder on the way out; say so in one line.
        name, code = ("SIGTERM", EXIT_SIGTERM) if isinstance(exc, _Terminated) else ("SIGINT", EXIT_SIGINT)
        raise StoppedBySignal(f"Stopped by {name}; the unfinished output was removed.", code) from None
    _print_summary(folder, time.perf_counter() - started)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT, so that
    prepare_data removes its staging folder on the way out."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While preparing, SIGTERM stops the command as Ctrl-C does; a second SIGTERM kills at once."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:  # the caller asked for SIGTERM to be ignored
        yield
        return
    if previous is None:  # a handler installed outside Python
        previous = signal.SIG_DFL

    def handle(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise _Terminated

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ProgressDisplay:
    """A rich progress line on stderr (terminals only): documents and tokens, and their rates."""

    def __init__(self, *, enabled: bool, total_tokens: int | None) -> None:
        self.progress: Progress | None = None
        if enabled and err.is_terminal:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]tokenizing"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=err,
                transient=True,
            )
            self.task = self.progress.add_task("tokenize", total=total_tokens, stats="starting")

    def __enter__(self) -> _ProgressDisplay:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, event: PrepareProgress) -> None:
        if self.progress is None:
            return
        seconds = max(event.elapsed_s, 1e-9)
        stats = (
            f"{event.documents:,} docs ({si(event.documents / seconds, 2)}/s) | "
            f"{event.tokens:,} tokens ({si(event.tokens / seconds, 2)}/s) | {si(event.text_bytes, 2)}B text"
        )
        self.progress.update(self.task, completed=event.tokens, stats=stats)


def _print_summary(path: Path, seconds: float) -> None:
    from gpt2cli.data.shards import TokenFolder

    folder = TokenFolder(path)
    split_by = folder.meta["split_by"]
    how = "no validation split" if split_by == "none" else f"validation split by {split_by}"
    table = Table(title=f"{path}  ({how})", title_justify="left")
    table.add_column("split")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("text bytes", justify="right")
    table.add_column("file")
    tokens = text_bytes = 0
    for split in folder.splits:
        info = folder.meta["splits"][split]
        table.add_row(split, f"{info['documents']:,}", f"{info['tokens']:,}", f"{info['text_bytes']:,}", info["file"])
        tokens += info["tokens"]
        text_bytes += info["text_bytes"]
    table.add_row("total", f"{folder.meta['documents']:,}", f"{tokens:,}", f"{text_bytes:,}", "meta.json", style="bold")
    print_wide(table)
    out.print(
        f"{tokens:,} tokens in {seconds:.2f} s ({si(tokens / max(seconds, 1e-9), 2)} tokens/s), "
        f"fingerprint {folder.fingerprint[:16]}"
    )
    empty = folder.meta.get("empty_documents", 0)
    if empty:
        out.print(
            f"skipped {empty:,} empty document{'s' if empty != 1 else ''} "
            "(empty files, or empty or null text fields)"
        )


def _verify(paths: list[str], *, progress: bool) -> None:
    """`gpt2 data --verify`: a table per folder; one Error line naming the damaged ones."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn

    from gpt2cli.data.shards import TokenFolder, verify_folder

    folders = [TokenFolder(p) for p in paths]  # a missing, foreign or truncated folder: one line, at once
    damaged = []
    for folder in folders:
        total = sum(folder.num_tokens(s) for s in folder.splits) * 2
        with Progress(TextColumn(f"[bold]verifying[/] {escape(str(folder.path))}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=err, transient=True, disable=not (progress and err.is_terminal)) as bar:
            task = bar.add_task("verify", total=total)
            intact, checks = verify_folder(folder, on_bytes=lambda done, bar=bar, task=task: bar.update(task, completed=done))
        table = Table(title=f"{folder.path}  (vocabulary {folder.vocab_size:,})", title_justify="left")
        for column in ("split", "tokens", "largest id", "ids outside the vocabulary"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for c in checks:
            outside = f"{c.out_of_vocabulary:,} (first at {c.first_out_of_vocabulary:,})" if c.out_of_vocabulary else "0"
            table.add_row(c.split, f"{c.tokens:,}", "-" if c.max_id is None else f"{c.max_id:,}", outside,
                          style="red" if c.out_of_vocabulary else None)
        print_wide(table)
        bad_ids = [c.split for c in checks if c.out_of_vocabulary]
        if intact and not bad_ids:
            out.print(f"intact: the tokens match meta.json's fingerprint {folder.fingerprint[:16]}", soft_wrap=True)
            continue
        problems = [] if intact else ["the tokens no longer match meta.json's fingerprint"]
        if bad_ids:
            problems.append(f"ids outside the vocabulary in {', '.join(bad_ids)}")
        out.print(f"[red]damaged[/]: {escape('; '.join(problems))}", soft_wrap=True)
        damaged.append(f"{str(folder.path)!r} ({'; '.join(problems)})")
    if damaged:
        raise UserError(f"damaged data: {', '.join(damaged)}",
                        "prepare the folder again from its sources, which its meta.json names")
