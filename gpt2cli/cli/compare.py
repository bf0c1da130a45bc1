"""`gpt2 compare`: runs side by side (a rich table, markdown, JSON or CSV) and their loss curves;
plus the command-line side of sweeps (`gpt2 train ... --sweep key=v1,v2 --seeds N`).

Results go to stdout; messages (plot written, sweep progress) to stderr.
"""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gpt2cli.cli.common import (
    FLAT_PRECEDENCE_HELP,
    ConfigOpt,
    err,
    field_help,
    flat_set_opt,
    out,
    print_wide,
)
from gpt2cli.errors import EXIT_INTERRUPTED, NonFiniteLossError, StoppedBySignal, UserError
from gpt2cli.specs import CompareSpec, build_spec

if TYPE_CHECKING:
    from gpt2cli.compare import Comparison
    from gpt2cli.specs import TrainSpec
    from gpt2cli.sweep import Point, Sweep

HELP = "Compare runs side by side: a table of metrics and a plot of loss curves."
SetOpt = flat_set_opt("compare")

FLAG_FOR_FIELD = {
    "runs": "RUN", "metric": "--metric", "target": "--target", "plot": "--plot", "plot_vs": "--plot-vs",
    "format": "--format",
    "group_by": "--group-by", "group_seeds": "--group-seeds", "chart": "--chart",
}


class OutputFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


class Metric(str, Enum):
    val_loss = "val_loss"
    val_ppl = "val_ppl"
    train_loss = "train_loss"
    hellaswag_acc_norm = "hellaswag_acc_norm"


def register(app: typer.Typer) -> None:
    app.command("compare", help=HELP + " " + FLAT_PRECEDENCE_HELP)(compare)


def _h(name: str) -> str:
    return field_help(CompareSpec, name)


def compare(
    runs: Annotated[list[str] | None, typer.Argument(
        help="Run folders, or a parent folder of runs such as a sweep's.", metavar="RUN...", show_default=False)] = None,
    metric: Annotated[Metric | None, typer.Option(help=_h("metric") + " [default: val_loss]",
                                                  show_default=False)] = None,
    target: Annotated[float | None, typer.Option(help=_h("target"), show_default=False)] = None,
    plot: Annotated[str | None, typer.Option(help=_h("plot"), metavar="FILE", show_default=False)] = None,
    plot_vs: Annotated[str | None, typer.Option(help=_h("plot_vs"), metavar="FIELD", show_default=False)] = None,
    output_format: Annotated[OutputFormat | None, typer.Option(
        "--format", help=_h("format") + " [default: table]", show_default=False)] = None,
    group_by: Annotated[str | None, typer.Option(help=_h("group_by"), metavar="FIELD[,FIELD]",
                                                 show_default=False)] = None,
    group_seeds: Annotated[bool | None, typer.Option("--group-seeds/--no-group-seeds", help=_h("group_seeds"),
                                                     show_default=False)] = None,
    chart: Annotated[bool | None, typer.Option("--chart/--no-chart", help=_h("chart"), show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compare runs side by side: a table of metrics and a plot of loss curves.

    One column per run; runs that differ only by seed share a column (mean ± std (n)). Rows: the
    spec fields that differ, parameters, KV-cache bytes per token, tokens seen, best and final val
    loss and perplexity, final train loss, tokens and time to --target, train tokens/s, MFU, peak
    memory and wall time; the best value of each row is marked.
    """
    flags = {
        "runs": runs or None, "metric": metric.value if metric else None, "target": target, "plot": plot,
        "plot_vs": plot_vs, "format": output_format.value if output_format else None, "group_by": group_by,
        "group_seeds": group_seeds, "chart": chart,
    }
    spec = build_spec(CompareSpec, config_file=config, flags=flags, sets=set_ or (), flag_names=FLAG_FOR_FIELD,
                      set_prefix="compare")
    if not spec.runs:
        raise UserError("no runs to compare", "gpt2 compare RUN [RUN ...], or a sweep's folder")
    if spec.plot_vs and not spec.plot:
        raise UserError("--plot-vs adds a panel to the --plot figure", "pass --plot FILE too")
    if spec.plot:
        from gpt2cli.plot import check_plot_path

        check_plot_path(spec.plot)
    from gpt2cli.compare import compare_paths

    result = compare_paths(spec.runs, metric=spec.metric, target=spec.target, group_by=spec.group_by,
                           group_seeds=spec.group_seeds, aliases=flag_aliases())
    show_comparison(result, spec)


def flag_aliases() -> dict[str, str]:
    """`gpt2 train` flag names without dashes -> spec paths (pos -> model.pos, kv-heads -> model.n_kv_head)."""
    from gpt2cli.cli.train import FLAG_FIELDS

    return {flag.lstrip("-"): f"{section}.{name}" for flag, (section, name) in FLAG_FIELDS.items()}


# ----------------------------------------------------------------------------------- output


def show_comparison(result: Comparison, spec: CompareSpec) -> None:
    """Print ``result`` in the spec's format and write the plot; a terminal chart under a table."""
    for note in result.notes:
        err.print(note, soft_wrap=True, markup=False, highlight=False)
    sweep = None
    if spec.plot and spec.plot_vs:  # refused, if it must be, before anything is printed
        from gpt2cli.compare import sweep_lines

        sweep = sweep_lines(result, spec.plot_vs, aliases=flag_aliases())
    if spec.format == "markdown":
        sys.stdout.write(result.to_markdown())
    elif spec.format == "json":
        sys.stdout.write(result.to_json())
    elif spec.format == "csv":
        sys.stdout.write(result.to_csv())
    else:
        print_table(result)
    sys.stdout.flush()
    if spec.plot:
        from gpt2cli.plot import write_plot

        path = write_plot(result.columns, spec.plot, metric=spec.metric, target=spec.target, sweep=sweep)
        err.print(f"plot written to {path}")
    elif spec.format == "table" and spec.chart:
        from gpt2cli.plot import terminal_chart

        text = terminal_chart(result.columns)
        if text:
            out.print()
            out.print(Text(text))


def comparison_table(result: Comparison) -> Table:
    n_runs = len(result.runs)
    title = f"{n_runs} run{'s' if n_runs != 1 else ''}"
    if len(result.columns) != n_runs:
        title += f" in {len(result.columns)} column{'s' if len(result.columns) != 1 else ''}"
    caption = "* best in row"
    if any(len(c.runs) > 1 for c in result.columns):
        caption += "; groups: mean ± std (n runs)"
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    for col in result.columns:
        table.add_column(col.label, justify="right", overflow="fold")
    for k, row in enumerate(result.rows):
        cells: list[Text | str] = []
        for i in range(len(result.columns)):
            text = result.cell(row, i)
            cells.append(Text(text + " *", style="bold green") if result.is_best(row, i) else text)
        end = row.spec and (k + 1 == len(result.rows) or not result.rows[k + 1].spec)
        table.add_row(Text(row.label, style="cyan" if row.spec else ""), *cells, end_section=end)
    return table


def print_table(result: Comparison) -> None:
    from gpt2cli.compare import METRICS

    print_wide(comparison_table(result))
    best = result.best_columns()
    if best and len(result.columns) > 1:
        row = next(r for r in result.rows if r.key == METRICS[result.metric])
        if len(best) == 1:
            out.print(f"best: {result.columns[best[0]].label} ({row.label} {result.cell(row, best[0])})",
                      soft_wrap=True)
        else:  # equal within the tie tolerance: no single winner
            names = ", ".join(result.columns[i].label for i in best)
            out.print(f"best: tie between {names} ({row.label} {result.cell(row, best[0])})", soft_wrap=True)


# ------------------------------------------------------------------------------------ sweeps


def train_sweep(spec: TrainSpec, values: dict[str, Any], config: str | None, sets: list[str],
                sweeps: list[str], seeds: int | None, *, spec_file: str | None = None,
                dry_run: bool = False) -> None:
    """`gpt2 train ... --sweep KEY=V1,V2 [--seeds N]`: build the grid from the command's own
    settings, train it into one parent folder, then print the comparison."""
    from gpt2cli.cli.train import FLAG_FIELDS, resolve_train_spec
    from gpt2cli.specs import parse_set
    from gpt2cli.sweep import (
        check_conflicts,
        failed,
        parse_axes,
        plan_sweep,
        prepare_folder,
        run_sweep,
    )

    if spec_file is not None:
        raise UserError("--spec runs one resolved spec; it cannot be combined with --sweep or --seeds",
                        "drop --spec, or drop --sweep/--seeds")
    resume = spec.run.resume
    if resume not in (None, "auto"):
        raise UserError(f"a sweep resumes with --resume auto, not --resume {resume}",
                        "rerun the sweep's command with --resume auto")
    axes = parse_axes(sweeps, flag_aliases())
    explicit = {f"{FLAG_FIELDS[f][0]}.{FLAG_FIELDS[f][1]}": f for f, v in values.items() if v is not None}
    for assignment in sets:
        explicit[".".join(parse_set(assignment)[0])] = f"--set {assignment}"
    if "run.out" in explicit and explicit["run.out"] != "--out":
        raise UserError(f"{explicit['run.out']} cannot name a sweep's runs", "--out names the sweep's folder")
    check_conflicts(axes, explicit)

    if spec.run.out:
        parent = Path(spec.run.out)
    else:
        from datetime import datetime

        parent = Path(spec.run.runs_dir) / f"sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def build(overrides: dict[str, str], seed: int, run_dir: Path) -> TrainSpec:
        point_values = {**values, "--out": str(run_dir)}
        extra = [f"{path}={raw}" for path, raw in overrides.items()] + [f"train.seed={seed}"]
        point = resolve_train_spec(point_values, config, [*sets, *extra], refuse_unused=False)
        _check_runnable(point)
        return point

    sweep = plan_sweep(parent, axes, 1 if seeds is None else seeds, spec.train.seed, build)
    if dry_run:
        _print_grid(sweep)
        return
    prepare_folder(sweep, resume=resume == "auto")
    total = len(sweep.points)
    err.print(f"[bold]sweep[/] {total} run{'s' if total != 1 else ''} -> {sweep.parent}", soft_wrap=True)

    def skip(point: Point, index: int) -> None:
        err.print(f"[dim]sweep {index + 1}/{total} {point.name}: done, skipped[/]", soft_wrap=True)

    def train_one(point: Point, index: int) -> str:
        err.print(f"[bold]sweep {index + 1}/{total}[/] {point.name}", soft_wrap=True)
        try:
            status, point.stop_after = _train_point(point.spec)
        except NonFiniteLossError as exc:  # the sweep goes on; this run's line says why it ended
            err.print(f"  [red]failed[/]: {escape(exc.message)}", soft_wrap=True)
            raise
        return status

    run_sweep(sweep, train_one, resume=resume == "auto", on_skip=skip)
    interrupted = [p for p in sweep.points if p.status == "interrupted"]
    stopped_after = [p for p in sweep.points if p.stop_after]
    if interrupted or (stopped_after and any(p.status == "pending" for p in sweep.points)):
        where = f"during {interrupted[0].name}" if interrupted else f"after {stopped_after[0].name}"
        err.print(f"[yellow]sweep stopped {where}; continue it with the same command "
                  f"and --resume auto[/]", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED)

    from gpt2cli.compare import compare_paths

    result = compare_paths([sweep.parent], aliases=flag_aliases())
    show_comparison(result, CompareSpec(runs=[str(sweep.parent)], chart=False))
    out.print(f"next: gpt2 compare {shlex.quote(str(sweep.parent))} "
              f"--plot {shlex.quote(str(sweep.parent / 'curves.png'))}", soft_wrap=True)
    bad = failed(sweep)
    if bad:
        raise NonFiniteLossError(
            f"{len(bad)} of {total} sweep runs stopped on a non-finite loss: {', '.join(p.name for p in bad)}",
            f"see {sweep.manifest_path}",
        )


def _check_runnable(spec: TrainSpec) -> None:
    """What `gpt2 train` checks before a run starts: GPUs present, batch arithmetic exact."""
    from gpt2cli.parallel.launch import check_gpus, under_torchrun
    from gpt2cli.train import plan_batches

    p = spec.parallel
    if not under_torchrun():
        check_gpus(p)
    plan_batches(spec, p.procs_per_node * p.nnodes)


def _train_point(spec: TrainSpec) -> tuple[str, bool]:
    """Train one run of a sweep: "done" or "interrupted", and whether a stop came too late to
    interrupt it (the sweep stops after it); a non-finite loss raises."""
    from gpt2cli.parallel.launch import needs_launch

    if needs_launch(spec.parallel):
        from gpt2cli.cli.train import CompletedDespiteSignal
        from gpt2cli.cli.train import run as run_train

        try:
            run_train(spec)
        except StoppedBySignal:
            return "interrupted", False
        except CompletedDespiteSignal:
            return "done", True
        except typer.Exit as exc:
            if exc.exit_code == 0:
                return "done", False
            if exc.exit_code == EXIT_INTERRUPTED:
                return "interrupted", False
            if exc.exit_code == 3:
                raise NonFiniteLossError("the run stopped on a non-finite loss") from exc
            raise
        return "done", False
    from gpt2cli.train import train as train_workflow

    result = train_workflow(spec, reporter=_sweep_progress(spec.run.quiet))
    return ("done" if result.finished else "interrupted"), result.late_signal is not None


def _sweep_progress(quiet: bool) -> Any:
    """TrainProgress whose summary is one line on stderr: stdout keeps the comparison."""
    from gpt2cli.cli.progress import TrainProgress

    class SweepProgress(TrainProgress):
        def end(self, result: Any) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None
            best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
            err.print(f"  {result.status}: {result.step:,}/{result.total_steps:,} steps{best}, "
                      f"{result.wall_s:.1f} s -> {result.run_dir}", soft_wrap=True)

    return SweepProgress(quiet=quiet)


def _print_grid(sweep: Sweep) -> None:
    from gpt2cli.train import plan_batches

    table = Table(title=f"sweep of {len(sweep.points)} runs -> {sweep.parent} (dry run: nothing written)",
                  title_justify="left")
    table.add_column("run", no_wrap=True)
    paths = list(dict.fromkeys(path for point in sweep.points for path in point.overrides))
    for path in paths:
        table.add_column(path)
    table.add_column("seed", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("tokens", justify="right")
    for point in sweep.points:
        p = point.spec.parallel
        plan = plan_batches(point.spec, p.procs_per_node * p.nnodes)
        table.add_row(point.name, *(point.overrides.get(path, "") for path in paths), str(point.seed),
                      f"{plan.total_steps:,}", f"{plan.total_steps * plan.tokens_per_step:,}")
    print_wide(table)
