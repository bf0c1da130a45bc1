"""How `gpt2 train` looks: a rich progress bar on a terminal, plain lines when piped, a summary
table at the end. Implements gpt2cli.train.Reporter."""

from __future__ import annotations

import shlex
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from gpt2cli.cli.common import err, out, print_wide, si


class TrainProgress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task: Any = None
        self.info: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------------ Reporter
    def start(self, info: dict[str, Any]) -> None:
        self.info = info
        if self.quiet:
            return
        resumed = f", resumed from {info['resumed_from']} at step {info['start_step']}" if info["resumed_from"] else ""
        if info.get("init"):
            resumed += f", fine-tuning {info['init']}"
        err.print(
            f"[bold]gpt2 train[/] -> {info['run_dir']}{resumed}\n"
            f"  model {info['params'] / 1e6:.2f}M params | {info['strategy']} x{info['world_size']} on "
            f"{info['device_name']} ({info['dtype']})\n"
            f"  batch {info['batch_size']} x {info['seq_len']} tokens x {info['grad_accum']} accum x "
            f"{info['world_size']} proc = {info['tokens_per_step']:,} tokens/step | {info['total_steps']:,} steps\n"
            f"  data {info['data']}"
        )
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=err, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"],
                                               stats="")

    def advance(self, step: int) -> None:
        # The bar and its eta move every step; the loss and speed columns at log rows (step()).
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def step(self, row: dict[str, Any]) -> None:
        stats = f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | {si(row['tokens_per_s'])} tok/s"
        if "mfu" in row:
            stats += f" | mfu {row['mfu'] * 100:.1f}%"
        if self.progress is not None:
            self.progress.update(self.task, completed=row["step"], stats=stats)
        elif not self.quiet:
            err.print(f"step {row['step']:>6}/{row['total_steps']} | {stats} | grad norm {row['grad_norm']:.3f}")

    def evaluation(self, row: dict[str, Any]) -> None:
        self.last_eval = row
        if self.quiet:
            return
        mark = " (best)" if row.get("best") else ""
        line = f"eval step {row['step']:>6} | val loss {row['val_loss']:.4f} | ppl {row['val_ppl']:.1f}"
        if "hellaswag_acc_norm" in row:
            line += f" | hellaswag acc_norm {row['hellaswag_acc_norm']:.4f}"
        line += mark
        (self.progress.console if self.progress else err).print(line, soft_wrap=True)  # one line, however narrow

    def message(self, text: str) -> None:
        # Plain text (a path may hold "[") and never folded: paths in messages stay copy-pastable.
        (self.progress.console if self.progress else err).print(Text(text, style="yellow"), soft_wrap=True)

    def end(self, result: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        table = Table(title=f"run {result.run_dir}", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("status", result.status)
        table.add_row("steps", f"{result.step:,} / {result.total_steps:,}")
        table.add_row("tokens seen", f"{result.tokens_seen:,}")
        if result.train_loss is not None:
            table.add_row("final train loss", f"{result.train_loss:.4f}")
        if result.val_loss is not None:
            table.add_row("final val loss", f"{result.val_loss:.4f}")
        if result.best_val_loss is not None:
            table.add_row("best val loss", f"{result.best_val_loss:.4f}")
        # A resumed run's own clock starts at the resume (gpt2 compare adds up the whole run).
        resumed = bool(self.info.get("resumed_from"))
        table.add_row("wall time, this session" if resumed else "wall time", f"{result.wall_s:.1f} s")
        table.add_row("checkpoint", str(result.checkpoint))
        if result.best is not None:
            table.add_row("best model", str(result.best))
        print_wide(table)
        run_dir = shlex.quote(str(result.run_dir))  # copy-pastable with spaces in the path
        if result.finished:
            out.print(f'next: gpt2 generate {run_dir} "ROMEO:"   |   gpt2 eval {run_dir}', soft_wrap=True)
        else:
            out.print(f"continue: gpt2 train --out {run_dir} --resume auto", soft_wrap=True)
