"""Compare training runs side by side: the library behind `gpt2 compare` and the end of a sweep.

A run folder is read through two files only: ``spec.json`` (the resolved TrainSpec) and
``metrics.jsonl`` (see :mod:`gpt2cli.metrics`). :func:`load_runs` turns folders into :class:`Run`
records (a parent folder, such as a sweep's, expands into the runs it holds); :func:`compare_runs`
groups them into :class:`Column` s and computes every row of the table; the ``to_*`` methods of
:class:`Comparison` render markdown, JSON and CSV (the CLI renders the rich table).

Grouping: runs whose specs differ only by ``train.seed`` (and ``run.*`` settings, which never
change what is trained) form one column shown as mean ± std (n); ``group_by`` groups by any spec
fields instead. The std is the sample standard deviation (n - 1). A run resumed under another
strategy or world size has ``parallel.strategy`` read from its metrics rows (``ddp→fsdp``), so it
never joins a column of runs trained one way.

Ranks and best marks treat values that print the same, or differ by less than
:data:`TIE_REL_TOL` relative, as ties.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2cli.errors import UserError
from gpt2cli.metrics import finite_or_null, read_metrics, read_status
from gpt2cli.specs import flatten

SPEC_NAME = "spec.json"
METRICS_NAME = "metrics.jsonl"
SWEEP_MANIFEST = "sweep.json"

# Spec sections that never change what is trained (where it is written, resume, printing),
# except the fields named in COMPARED_RUN_FIELDS: the weights a fine-tuning run starts from do.
IGNORED_SECTIONS = ("run",)
COMPARED_RUN_FIELDS = ("run.init",)
SEED_FIELD = "train.seed"
STRATEGY_FIELD = "parallel.strategy"


def _ignored(key: str) -> bool:
    return key.split(".")[0] in IGNORED_SECTIONS and key not in COMPARED_RUN_FIELDS

# Values closer than this (relative), or equal as printed, are ties: they share a rank and a mark.
TIE_REL_TOL = 1e-6

# --metric -> (the per-run value that ranks columns, what --target is compared with)
METRICS = {
    "val_loss": "best_val_loss",
    "val_ppl": "best_val_ppl",
    # Logged train losses are minibatch values; their minimum is biased low, the final one is not.
    "train_loss": "final_train_loss",
    "hellaswag_acc_norm": "best_hellaswag_acc_norm",
}
METRIC_LABELS = {"val_loss": "val loss", "val_ppl": "val perplexity", "train_loss": "train loss",
                 "hellaswag_acc_norm": "HellaSwag acc_norm"}


@dataclass(frozen=True)
class RowDef:
    """One metric row: ``better`` is "min", "max" or None (not ranked)."""

    key: str
    label: str
    better: str | None
    kind: str  # loss | ppl | acc | si | bytes | duration | pct | int | text


METRIC_ROWS: tuple[RowDef, ...] = (
    RowDef("params", "parameters", None, "si"),
    RowDef("kv_cache_bytes_per_token", "KV cache per token (bf16)", "min", "bytes"),
    RowDef("tokens", "tokens seen", None, "si"),
    RowDef("best_val_loss", "best val loss", "min", "loss"),
    RowDef("final_val_loss", "final val loss", "min", "loss"),
    RowDef("best_val_ppl", "best val perplexity", "min", "ppl"),
    RowDef("final_val_ppl", "final val perplexity", "min", "ppl"),
    RowDef("final_train_loss", "final train loss", "min", "loss"),
    # --hellaswag runs only (scored on the same examples at every evaluation)
    RowDef("best_hellaswag_acc_norm", "best HellaSwag acc_norm", "max", "acc"),
    RowDef("final_hellaswag_acc_norm", "final HellaSwag acc_norm", "max", "acc"),
    RowDef("final_hellaswag_acc", "final HellaSwag acc", "max", "acc"),
    RowDef("tokens_to_target", "tokens to target", "min", "si"),
    RowDef("time_to_target_s", "time to target", "min", "duration"),
    RowDef("tokens_per_s", "train tokens/s", "max", "si"),
    RowDef("mfu", "MFU", "max", "pct"),
    RowDef("peak_mem_bytes", "peak memory", "min", "bytes"),
    RowDef("wall_time_s", "wall time", "min", "duration"),
)
METRIC_KEYS = tuple(r.key for r in METRIC_ROWS)


def rank_row(metric: str) -> RowDef:
    """The row that ranks the runs by ``metric`` (one of METRICS); its ``better`` says which way."""
    return next(d for d in METRIC_ROWS if d.key == METRICS[metric])
TARGET_KEYS = ("tokens_to_target", "time_to_target_s")
PPL_KEYS = ("best_val_ppl", "final_val_ppl")


# ------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    name: str
    spec: dict[str, Any]
    fields: dict[str, Any]  # the spec flattened to dotted paths
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    step: int
    total_steps: int | None
    status: str  # done | partial | no metrics | failed | interrupted | early-stopped | ... (a sweep's record wins)
    metrics: dict[str, float | None] = field(default_factory=dict)
    # (strategy, world size, first step) of each stretch of train rows trained one way; empty for
    # runs whose rows do not record them (written before they did)
    segments: list[tuple[str, int, int]] = field(default_factory=list)

    def val_points(self) -> list[tuple[float, float]]:
        return _points(self.eval_rows, "val_loss")

    def train_points(self) -> list[tuple[float, float]]:
        return _points(self.train_rows, "loss")

    def hellaswag_points(self) -> list[tuple[float, float]]:
        return _points(self.eval_rows, "hellaswag_acc_norm")

    def series(self, metric: str) -> list[dict[str, Any]]:
        """Rows that carry ``metric`` (one of METRICS), in order."""
        if metric == "train_loss":
            return [{**r, "value": r.get("loss")} for r in self.train_rows]
        return [{**r, "value": r.get(metric)} for r in self.eval_rows]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "status": self.status, "step": self.step,
                "total_steps": self.total_steps, "seed": self.fields.get(SEED_FIELD),
                "segments": [{"strategy": s, "world_size": w, "first_step": step} for s, w, step in self.segments],
                "metrics": dict(self.metrics)}


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["tokens"]), float(r[key])) for r in rows
            if _finite(r.get(key)) and isinstance(r.get("tokens"), (int, float))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / SPEC_NAME).is_file()


def find_runs(paths: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Run folders named by ``paths``: a run folder is itself; a sweep's folder gives its runs in
    the manifest's order (with their recorded status); another parent folder gives the runs
    directly inside it, sorted by name. Anything else is a UserError naming it."""
    found: list[tuple[Path, str | None]] = []
    seen: set[Path] = set()

    def add(p: Path, status: str | None) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append((p, status))

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{str(p)!r} does not exist", "pass run folders written by gpt2 train, or a sweep's folder")
        if not p.is_dir():
            raise UserError(f"{str(p)!r} is not a run folder (not a folder)",
                            "pass the run's folder, not a file inside it")
        if is_run_dir(p):
            add(p, None)
            continue
        children = _sweep_children(p)
        if children is None:
            children = [(c, None) for c in sorted(p.iterdir(), key=lambda c: c.name) if c.is_dir() and is_run_dir(c)]
        if not children:
            raise UserError(f"{str(p)!r} is not a run folder: it has no {SPEC_NAME} and holds no runs",
                            "pass folders written by gpt2 train, or a sweep's folder")
        for child, status in children:
            add(child, status)
    return found


def _sweep_children(parent: Path) -> list[tuple[Path, str | None]] | None:
    manifest = parent / SWEEP_MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        entries = data["runs"]
        return [(parent / e["dir"], e.get("status")) for e in entries if is_run_dir(parent / e["dir"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {manifest}: {exc}", "the sweep folder is damaged") from exc


def load_run(path: str | Path, sweep_status: str | None = None) -> Run:
    """Read one run folder; a run that is still training, or has no eval rows yet, gives what it has."""
    p = Path(path)
    spec_path = p / SPEC_NAME
    if not spec_path.is_file():
        raise UserError(f"{str(p)!r} is not a run folder (no {SPEC_NAME})",
                        "pass folders written by gpt2 train, or a sweep's folder")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {spec_path}: {exc}", "the run folder is damaged") from exc
    if not isinstance(spec, dict):
        raise UserError(f"{spec_path} does not hold a spec", "the run folder is damaged")
    rows = _with_elapsed(read_metrics(p / METRICS_NAME))
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    step = max((int(r.get("step", 0)) for r in rows), default=0)
    recorded = read_status(p) or {}  # how the run itself says it ended, and at which step
    if isinstance(recorded.get("step"), int):
        step = max(step, recorded["step"])  # steps done past the last logged row (a failure, a kill)
    total = _planned_steps(spec)
    if not rows:
        status = "no metrics"
    elif total is not None and step >= total:
        status = "done"
    else:
        status = "partial"
    if sweep_status in ("failed", "interrupted", "running") and status != "done":
        status = sweep_status
    elif status != "done":
        ended = recorded.get("status")
        if ended in ("failed", "interrupted", "early-stopped"):
            status = ended
    fields = flatten(spec)
    segments = _segments(train_rows)
    mixed = strategy_history(segments)
    if mixed is not None:  # spec.json holds the last segment's strategy only
        fields[STRATEGY_FIELD] = mixed
    run = Run(path=p, name=p.name, spec=spec, fields=fields, train_rows=train_rows,
              eval_rows=eval_rows, step=step, total_steps=total, status=status, segments=segments)
    run.metrics = _run_metrics(run)
    return run


def _segments(train_rows: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(strategy, world size, first step) of each run of consecutive train rows that record the
    same strategy and world size (rows without them are skipped)."""
    segments: list[tuple[str, int, int]] = []
    for row in train_rows:
        strategy, world = row.get("strategy"), row.get("world_size")
        if not isinstance(strategy, str) or not isinstance(world, int) or isinstance(world, bool):
            continue
        if not segments or segments[-1][:2] != (strategy, world):
            start = _start_step(row)  # the first trained step is start_step + 1
            segments.append((strategy, world, start + 1 if start is not None else int(row.get("step", 0))))
    return segments


def strategy_history(segments: Sequence[tuple[str, int, int]]) -> str | None:
    """``ddp→fsdp`` for a run trained one way and resumed another (``ddp x2→ddp x4`` when the
    world size changed); None for a run trained one way throughout."""
    if len(segments) < 2:
        return None
    if len({world for _, world, _ in segments}) == 1:
        return "→".join(strategy for strategy, _, _ in segments)
    return "→".join(f"{strategy} x{world}" for strategy, world, _ in segments)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    return [load_run(p, status) for p, status in find_runs(paths)]


def _start_step(row: Mapping[str, Any]) -> int | None:
    """The step the row's process started (or resumed) at, where the row records it."""
    value = row.get("start_step")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _segment_starts(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """For each row, whether it opens a segment: the first row, and the first of every resume,
    where start_step changes or (rows written before they recorded it) time_s goes down, as it
    restarts at 0 in a resumed process."""
    starts: list[bool] = []
    prev_start: int | None = None
    last_t: float | None = None
    for i, row in enumerate(rows):
        start, t = _start_step(row), row.get("time_s")
        if i == 0:
            opens = True
        elif start is not None or prev_start is not None:
            opens = start != prev_start
        else:
            opens = last_t is not None and _finite(t) and t < last_t
        starts.append(opens)
        prev_start = start
        if _finite(t):
            last_t = float(t)
    return starts


def _with_elapsed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``elapsed_s``: time_s restarts at 0 when a run is resumed, so the wall time of a
    resumed run is the sum of its segments (each ending at its last time_s)."""
    offset = last = 0.0
    out = []
    for row, opens in zip(rows, _segment_starts(rows), strict=True):
        if opens:
            offset, last = offset + last, 0.0
        t = row.get("time_s")
        if _finite(t):
            last = float(t)
            row = {**row, "elapsed_s": offset + float(t)}
        out.append(row)
    return out


def _planned_steps(spec: dict[str, Any]) -> int | None:
    from pydantic import ValidationError

    from gpt2cli.specs import TrainSpec

    try:
        typed = TrainSpec.model_validate(spec)
        from gpt2cli.train import plan_batches

        p = typed.parallel
        return plan_batches(typed, p.procs_per_node * p.nnodes).total_steps
    except (ValidationError, UserError):
        return None


_MODEL_CACHE: dict[str, tuple[int | None, int | None]] = {}


def _model_numbers(model: Any) -> tuple[int | None, int | None]:
    """(parameters, bf16 KV-cache bytes per token) of a stored model spec, or Nones."""
    if not isinstance(model, dict):
        return None, None
    key = json.dumps(model, sort_keys=True)
    if key not in _MODEL_CACHE:
        from pydantic import ValidationError

        from gpt2cli.specs import ModelSpec

        try:
            from gpt2cli.modelinfo import model_stats

            stats = model_stats(ModelSpec.model_validate(model))
            _MODEL_CACHE[key] = (stats["params"], stats["kv_cache_bytes_per_token"]["bf16"])
        except (ValidationError, UserError):
            _MODEL_CACHE[key] = (None, None)
    return _MODEL_CACHE[key]


def _steady_windows(train_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged windows that throughput is taken from: without the first window of the run and
    of every resumed segment, which hold start-up and compile time. Runs too short to spare them
    keep all."""
    steady = [row for row, opens in zip(train_rows, _segment_starts(train_rows), strict=True) if not opens]
    return steady if len(steady) >= 2 else train_rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(rows):
        if key in row:
            return row[key] if _finite(row[key]) else None
    return None


def _run_metrics(run: Run) -> dict[str, float | None]:
    params, kv = _model_numbers(run.spec.get("model"))
    rows = run.train_rows + run.eval_rows
    vals = [r["val_loss"] for r in run.eval_rows if _finite(r.get("val_loss"))]
    windows = _steady_windows(run.train_rows)
    mem = [r.get(k) for r in run.train_rows for k in ("peak_mem_bytes", "peak_rss_bytes") if _finite(r.get(k))]
    best = min(vals) if vals else None
    final_val = _last(run.eval_rows, "val_loss")
    accs = [r["hellaswag_acc_norm"] for r in run.eval_rows if _finite(r.get("hellaswag_acc_norm"))]
    return {
        "params": params,
        "kv_cache_bytes_per_token": kv,
        "tokens": max((r["tokens"] for r in rows if _finite(r.get("tokens"))), default=None),
        "best_val_loss": best,
        "final_val_loss": final_val,
        "best_val_ppl": _ppl(best),
        "final_val_ppl": _ppl(final_val),
        "final_train_loss": _last(run.train_rows, "loss"),
        "best_hellaswag_acc_norm": max(accs) if accs else None,
        "final_hellaswag_acc_norm": _last(run.eval_rows, "hellaswag_acc_norm"),
        "final_hellaswag_acc": _last(run.eval_rows, "hellaswag_acc"),
        "tokens_per_s": _median([r["tokens_per_s"] for r in windows if _finite(r.get("tokens_per_s"))]),
        "mfu": _median([r["mfu"] for r in windows if _finite(r.get("mfu"))]),
        "peak_mem_bytes": max(mem) if mem else None,
        "wall_time_s": max((r["elapsed_s"] for r in rows if "elapsed_s" in r), default=None),
    }


def _ppl(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 50 else None


def time_to_target(run: Run, metric: str, target: float) -> tuple[float | None, float | None]:
    """(tokens, wall seconds) at the first logged row where ``metric`` reaches ``target``: at or
    below it, at or above it for a metric where higher is better."""
    higher = rank_row(metric).better == "max"
    for row in run.series(metric):
        value = row["value"]
        if _finite(value) and (value >= target if higher else value <= target):
            return row.get("tokens"), row.get("elapsed_s")
    return None, None


# -------------------------------------------------------------------------------- columns


@dataclass
class Stat:
    """A row value of one column: the values of its runs that have one, out of ``total``."""

    values: list[float]
    total: int
    # Perplexities: the mean is exp(mean of the losses), the geometric mean, so that a perplexity
    # row ranks the columns as its loss row does; no std is given (the loss row has the spread).
    geometric: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        if not self.values:
            return None
        if self.geometric and all(v > 0 for v in self.values):
            return math.exp(statistics.fmean(math.log(v) for v in self.values))
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        if self.geometric:
            return None
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


@dataclass
class Column:
    label: str
    runs: list[Run]
    stats: dict[str, Stat] = field(default_factory=dict)
    rank: int | None = None

    def field_values(self, path: str) -> list[Any]:
        """The distinct values of a spec field over this column's runs, in order."""
        values: list[Any] = []
        for run in self.runs:
            v = run.fields.get(path)
            if v not in values:
                values.append(v)
        return values

    @property
    def status(self) -> str:
        if len(self.runs) == 1:
            run = self.runs[0]
            if run.status in ("partial", "failed", "interrupted", "running", "early-stopped") and run.total_steps:
                return f"{run.status}: step {run.step:,} of {run.total_steps:,}"
            return run.status
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in counts.items())


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    better: str | None
    kind: str
    spec: bool = False  # a spec field rather than a metric


@dataclass
class Comparison:
    columns: list[Column]
    rows: list[Row]
    best: dict[str, list[int]]  # row key -> indices of the columns marked best
    metric: str
    target: float | None
    group_by: list[str] | None
    runs: list[Run]
    notes: list[str] = field(default_factory=list)  # one line each, for stderr (duplicate runs)

    # ----------------------------------------------------------------- cells
    def cell(self, row: Row, index: int) -> str:
        """The text of one cell (no best marking)."""
        col = self.columns[index]
        if row.spec:
            return ", ".join(format_field(v) for v in col.field_values(row.key))
        if row.key == "status":
            return col.status
        if row.key == "runs":
            return str(len(col.runs))
        if row.key == "rank":
            return "-" if col.rank is None else str(col.rank)
        return format_stat(col.stats[row.key], row.kind, missing="not reached" if row.key in TARGET_KEYS else "-")

    def is_best(self, row: Row, index: int) -> bool:
        return index in self.best.get(row.key, ())

    def best_columns(self) -> list[int]:
        """The columns ranked first by the metric: several when they tie, none without values."""
        return [i for i, c in enumerate(self.columns) if c.rank == 1]

    def best_column(self) -> int | None:
        """The one column ranked first by the metric (None when no column has a value, or on a tie)."""
        ranked = self.best_columns()
        return ranked[0] if len(ranked) == 1 else None

    # ----------------------------------------------------------------- renderings
    def to_markdown(self) -> str:
        """A GitHub table: one column per run or group, the best value of a row in bold."""
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = ["| | " + " | ".join(esc(c.label) for c in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for i in range(len(self.columns)):
                text = esc(self.cell(row, i))
                cells.append(f"**{text}**" if self.is_best(row, i) else text)
            lines.append(f"| {esc(row.label)} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Everything, as raw numbers: columns with their spec fields and statistics, and runs."""
        spec_rows = [r.key for r in self.rows if r.spec]
        columns = []
        for i, col in enumerate(self.columns):
            spec = {}
            for key in spec_rows:
                values = [list(v) if isinstance(v, tuple) else v for v in col.field_values(key)]
                spec[key] = values[0] if len(values) == 1 else values
            columns.append({
                "label": col.label,
                "runs": [str(r.path) for r in col.runs],
                "n": len(col.runs),
                "status": col.status,
                "rank": col.rank,
                "spec": spec,
                "metrics": {k: col.stats[k].to_dict() for k in METRIC_KEYS if k in col.stats},
                "best": [key for key, idx in self.best.items() if i in idx],
            })
        return {
            "metric": self.metric,
            "rank_by": METRICS[self.metric],
            "target": self.target,
            "group_by": self.group_by,
            "rows": [{"key": r.key, "label": r.label, "better": r.better, "spec": r.spec} for r in self.rows],
            "columns": columns,
            "runs": [r.to_dict() for r in self.runs],
        }

    def to_json(self) -> str:
        # Strict JSON: a NaN/inf (a run that diverged) is null.
        return json.dumps(finite_or_null(self.to_dict()), indent=2, default=str, allow_nan=False) + "\n"

    def to_csv(self) -> str:
        """One line per column: label, n, runs (;-separated), status, rank, the differing spec
        fields, then each metric as mean and std (std empty for a single run)."""
        spec_rows = [r.key for r in self.rows if r.spec]
        metric_keys = [k for k in METRIC_KEYS if any(r.key == k for r in self.rows)]
        header = ["label", "n", "runs", "status", "rank", *spec_rows]
        for key in metric_keys:
            header += [key, f"{key}_std"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for col in self.columns:
            line: list[Any] = [col.label, len(col.runs), ";".join(str(r.path) for r in col.runs), col.status,
                               "" if col.rank is None else col.rank]
            for key in spec_rows:
                line.append(";".join(format_field(v) for v in col.field_values(key)))
            for key in metric_keys:
                stat = col.stats[key]
                line += [_csv_number(stat.mean), _csv_number(stat.std)]
            writer.writerow(line)
        return buf.getvalue()


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


# ------------------------------------------------------------------------------ comparing


def resolve_field(name: str, known: Sequence[str], aliases: Mapping[str, str] | None = None, *,
                  what: str = "", unknown: str = "is not a spec field",
                  hint: str = "use a dotted path such as model.pos (see docs/specs.md)") -> str:
    """A spec field from a dotted path (model.pos), a flag alias (pos, kv-heads) or a field name
    that is unique across sections (n_kv_head). ``what`` prefixes the name in errors (e.g.
    "--sweep key "); ``unknown`` and ``hint`` word the error for a name that matches nothing."""
    key = name.strip().lstrip("-")
    if aliases and key in aliases:
        return aliases[key]
    if key in known:
        return key
    leaf = key.replace("-", "_")
    matches = [k for k in known if k.split(".")[-1] == leaf]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"{what}{name!r} is ambiguous: {', '.join(sorted(matches))}", "use the dotted path")
    raise UserError(f"{what}{name!r} {unknown}", hint)


def _group_key(run: Run, paths: Sequence[str] | None) -> str:
    """The values of the group-by fields, or the whole spec without seed and run settings."""
    if paths is not None:
        return json.dumps([run.fields.get(p) for p in paths], default=str)
    kept = {k: v for k, v in run.fields.items()
            if not _ignored(k) and k != SEED_FIELD}
    return json.dumps(sorted(kept.items()), default=str)


def compare_runs(
    runs: Sequence[Run],
    metric: str = "val_loss",
    target: float | None = None,
    group_by: str | Sequence[str] | None = None,
    group_seeds: bool = True,
    aliases: Mapping[str, str] | None = None,
) -> Comparison:
    """Group ``runs`` into columns and compute every row of the comparison."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}", f"choose one of: {', '.join(METRICS)}")
    if not runs:
        raise UserError("no runs to compare", "pass run folders written by gpt2 train, or a sweep's folder")
    known = sorted({k for r in runs for k in r.fields})
    names: list[str] | None = None
    paths: list[str] | None = None
    if group_by:
        names = [g.strip() for g in (group_by.split(",") if isinstance(group_by, str) else group_by) if g.strip()]
        paths = [resolve_field(g, known, aliases) for g in names]

    notes: list[str] = []
    if paths is not None or group_seeds:
        runs, notes = _drop_duplicates(runs)
    groups: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        key = _group_key(run, paths) if paths is not None or group_seeds else str(i)
        groups.setdefault(key, []).append(run)
    columns = [Column(label="", runs=members) for members in groups.values()]

    # Spec rows: the fields whose values differ between columns, and (their cells show the mixed
    # values) those that vary within a column; seeds within a column of seeds go without saying.
    spec_fields, between = [], []
    for key in known:
        if _ignored(key):
            continue
        shown = [json.dumps(c.field_values(key), default=str) for c in columns]
        if len(set(shown)) > 1:
            between.append(key)
            spec_fields.append(key)
        elif (paths is not None or key != SEED_FIELD) and any(len(c.field_values(key)) > 1 for c in columns):
            spec_fields.append(key)
    _label_columns(columns, between, names, paths)

    for col in columns:
        for key in METRIC_KEYS:
            values: list[float] = []
            for run in col.runs:
                if key in TARGET_KEYS:
                    if target is None:
                        continue
                    tokens, seconds = time_to_target(run, metric, target)
                    value = tokens if key == "tokens_to_target" else seconds
                else:
                    value = run.metrics.get(key)
                if _finite(value):
                    values.append(float(value))  # type: ignore[arg-type]
            col.stats[key] = Stat(values, len(col.runs), geometric=key in PPL_KEYS)

    ranking = rank_row(metric)
    rank_key, rank_kind, higher = ranking.key, ranking.kind, ranking.better == "max"
    means = [c.stats[rank_key].mean for c in columns]
    # A mean over only some runs of a group (no eval yet) ranks after every complete column.
    full = [c.stats[rank_key].n == len(c.runs) for c in columns]
    any_full = any(ok and m is not None for ok, m in zip(full, means, strict=True))
    for col, mean, ok in zip(columns, means, full, strict=True):
        if mean is None:
            continue
        peers = [m for m, o in zip(means, full, strict=True) if m is not None and (o == ok or not any_full)]
        ahead = 0 if ok or not any_full else sum(1 for m, o in zip(means, full, strict=True) if m is not None and o)
        # ties share a rank: 1, 1, 3
        col.rank = 1 + ahead + sum(1 for m in peers if (m > mean if higher else m < mean)
                                   and not _tied_row(m, mean, rank_kind))

    rows: list[Row] = [Row(k, k, None, "text", spec=True) for k in spec_fields]
    if any(len(c.runs) > 1 for c in columns):
        rows.append(Row("runs", "runs", None, "int"))
    rows.append(Row("status", "status", None, "text"))
    if len(columns) > 1:
        rows.append(Row("rank", f"rank by {ranking.label}", "min", "int"))
    metric_label = METRIC_LABELS[metric]
    for d in METRIC_ROWS:
        if d.key in TARGET_KEYS:
            if target is None:
                continue
            what = "tokens" if d.key == "tokens_to_target" else "time"
            rows.append(Row(d.key, f"{what} to {metric_label} {'>=' if higher else '<='} {target:g}", d.better,
                            d.kind))
        elif any(c.stats[d.key].n for c in columns):
            label = d.label
            if d.key == "peak_mem_bytes":
                label = _memory_label(runs)
            rows.append(Row(d.key, label, d.better, d.kind))

    best: dict[str, list[int]] = {}
    if len(columns) > 1:
        for row in rows:
            if row.better is None:
                continue
            if row.key == "rank":
                scores: list[float | None] = [c.rank for c in columns]
            else:
                scores = [c.stats[row.key].mean for c in columns]
            present = [s for s in scores if s is not None]
            if len(present) < 2:
                continue
            extreme = min(present) if row.better == "min" else max(present)
            if all(_tied_row(s, extreme, row.kind) for s in present):
                continue  # all equal: nothing to mark
            if row.key != "rank":
                # A mean over only some runs of a group (the others never reached the target, or
                # have no eval yet) is not marked best while a column with all of its runs competes.
                complete = [c.stats[row.key].n == len(c.runs) for c in columns]
                if any(ok and sc is not None for ok, sc in zip(complete, scores, strict=True)):
                    scores = [sc if ok else None for ok, sc in zip(complete, scores, strict=True)]
                    present = [s for s in scores if s is not None]
            top = min(present) if row.better == "min" else max(present)
            best[row.key] = [i for i, s in enumerate(scores) if s is not None and _tied_row(s, top, row.kind)]
    ranked = METRICS[metric]
    if columns and all(c.stats[ranked].mean is None for c in columns if ranked in c.stats):
        why = "train with --hellaswag to log it" if metric == "hellaswag_acc_norm" else "none has an evaluation yet"
        notes.append(f"note: no run has a {metric} to rank by ({why})")
    return Comparison(columns=columns, rows=rows, best=best, metric=metric, target=target,
                      group_by=paths, runs=list(runs), notes=notes)


def _drop_duplicates(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """Runs with the same settings and seed (copies of one run, say in two folders) are one run:
    keep the most complete (the first of equals) in the place of the first, and a note for each
    set of duplicates. Seeds of a group are then distinct, so n counts independent runs."""
    sets: dict[str, list[Run]] = {}
    for run in runs:
        sets.setdefault(_group_key(run, None) + json.dumps(run.fields.get(SEED_FIELD), default=str), []).append(run)
    kept: dict[int, Run] = {}
    notes: list[str] = []
    for members in sets.values():
        # The most complete: the furthest step, then the most evaluations, then the most rows (a copy
        # cut short can lose its last eval row and keep the step); max keeps the first of equals.
        chosen = max(members, key=lambda r: (r.step, len(r.eval_rows), len(r.train_rows)))
        kept[id(members[0])] = chosen
        if len(members) > 1:
            names = [str(r.path) for r in members]
            listed = " and ".join(names) if len(names) == 2 else ", ".join(names[:-1]) + " and " + names[-1]
            notes.append(f"note: runs {listed} have the same settings and seed; counted once "
                         f"(kept {chosen.path})")
    return [kept[id(r)] for r in runs if id(r) in kept], notes


def compare_paths(paths: Sequence[str | Path], **kwargs: Any) -> Comparison:
    """:func:`load_runs` then :func:`compare_runs`."""
    return compare_runs(load_runs(paths), **kwargs)


@dataclass
class SweepLines:
    """The ranking metric of every column against one numeric spec field (``gpt2 compare
    --plot-vs``): one line per value of the other fields that differ between columns."""

    field: str
    metric: str  # the per-run value plotted, e.g. best_val_loss
    lines: dict[str, list[tuple[float, Stat]]]  # label -> (x, the column's stat), sorted by x


def sweep_lines(result: Comparison, name: str, aliases: Mapping[str, str] | None = None) -> SweepLines:
    """Group ``result``'s columns into lines over the spec field ``name`` (a dotted path, flag
    alias or unique field name). Fields that follow from it (min_lr from lr, say) do not split
    lines. A column whose value of the field is not one number is a UserError."""
    known = sorted({key for run in result.runs for key in run.fields})
    path = resolve_field(name, known, aliases)
    xs: list[float] = []
    for col in result.columns:
        values = col.field_values(path)
        if len(values) != 1 or isinstance(values[0], bool) or not isinstance(values[0], int | float):
            shown = ", ".join(format_field(v) for v in values)
            raise UserError(
                f"--plot-vs {name}: column {col.label!r} has {path} = {shown}, not one number",
                f"plot against a numeric field, and group the runs by it (--group-by {name})",
            )
        xs.append(float(values[0]))
    others = [row.key for row in result.rows if row.spec and row.key not in (path, SEED_FIELD)]

    def follows_from_x(key: str) -> bool:
        seen: dict[float, str] = {}
        for x, col in zip(xs, result.columns, strict=True):
            value = repr(col.field_values(key))
            if seen.setdefault(x, value) != value:
                return False
        return True

    splitting = [key for key in others if not follows_from_x(key)]
    metric = METRICS[result.metric]
    lines: dict[str, list[tuple[float, Stat]]] = {}
    for x, col in zip(xs, result.columns, strict=True):
        stat = col.stats.get(metric)
        if stat is None or not stat.values:
            continue  # no eval rows yet: nothing to plot
        label = ", ".join(f"{key.split('.')[-1]}={', '.join(format_field(v) for v in col.field_values(key))}"
                          for key in splitting)
        points = lines.setdefault(label, [])
        same = next((i for i, (px, _) in enumerate(points) if px == x), None)
        if same is None:
            points.append((x, stat))
        else:  # runs not grouped (--no-group-seeds): one point of the line, mean ± std of them all
            old = points[same][1]
            points[same] = (x, Stat(old.values + stat.values, old.total + stat.total, geometric=stat.geometric))
    for points in lines.values():
        points.sort(key=lambda point: point[0])
    return SweepLines(field=path, metric=metric, lines=lines)


def _memory_label(runs: Sequence[Run]) -> str:
    kinds = {k for r in runs for row in r.train_rows for k in ("peak_mem_bytes", "peak_rss_bytes") if k in row}
    if kinds == {"peak_mem_bytes"}:
        return "peak CUDA memory"
    if kinds == {"peak_rss_bytes"}:
        return "peak memory (RSS)"
    return "peak memory (CUDA or RSS)"


# "seed=1337", "seed1", "-s2" in a run's name, so that a group of seeds is labelled by the rest.
_SEED_RE = re.compile(r"(?:^|[_\-.,])(?:seed|s)[=\-_]?\d+(?=$|[_\-.,])", re.IGNORECASE)


def _label_columns(columns: list[Column], spec_fields: list[str], names: list[str] | None,
                   paths: list[str] | None) -> None:
    if names is not None and paths is not None:
        for col in columns:
            col.label = ", ".join(f"{n}={format_field(col.runs[0].fields.get(p))}" for n, p in zip(names, paths, strict=True))
        return
    varying = [k for k in spec_fields if k != SEED_FIELD]
    leaves = [k.split(".")[-1] for k in varying]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(varying, leaves, strict=True)}
    for col in columns:
        if len(col.runs) == 1:
            col.label = col.runs[0].name
            continue
        stripped = {_SEED_RE.sub("", r.name).strip("_-.,") for r in col.runs}
        parents = {r.path.resolve().parent.name for r in col.runs}
        if len(stripped) == 1 and next(iter(stripped)):
            col.label = next(iter(stripped))
        elif stripped == {""} and len(parents) == 1:  # a sweep of seeds only: seed=1337, seed=1338
            col.label = next(iter(parents))
        elif varying:
            col.label = ", ".join(f"{short[k]}={format_field(col.runs[0].fields.get(k))}" for k in varying)
        else:
            col.label = f"{col.runs[0].name} +{len(col.runs) - 1}"
    # Same label twice (runs or sweep points of the same name in two folders): add the folder.
    labels = [c.label for c in columns]
    for col in columns:
        parents = {r.path.resolve().parent.name for r in col.runs}
        if labels.count(col.label) > 1 and len(parents) == 1:
            col.label = f"{next(iter(parents))}/{col.label}"


# ------------------------------------------------------------------------------ formatting


def tied(a: float, b: float, kind: str) -> bool:
    """Equal for ranking: the same as printed (``format_value``), or within TIE_REL_TOL relative,
    so that float noise (9.8640 against 9.8640 + 2e-7) never ranks one run above another."""
    return a == b or math.isclose(a, b, rel_tol=TIE_REL_TOL) or format_value(a, kind) == format_value(b, kind)


def _tied_row(a: float, b: float, kind: str) -> bool:
    """:func:`tied` for ranking and marks; perplexities (exp of a mean loss) compare as their
    losses, so that a perplexity row always marks the same columns as its loss row."""
    if kind == "ppl" and a > 0 and b > 0:
        return tied(math.log(a), math.log(b), "loss")
    return tied(a, b, kind)


def format_field(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_field(v) for v in value) + "]"
    return str(value)


def format_value(value: float, kind: str) -> str:
    if kind in ("loss", "acc"):
        return f"{value:.4f}"
    if kind == "ppl":
        return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"
    if kind == "si":
        return _si(value)
    if kind == "bytes":
        return _bytes(value)
    if kind == "duration":
        return _duration(value)
    if kind == "pct":
        return f"{value * 100:.1f}%"
    if kind == "int":
        return f"{value:,.0f}"
    return str(value)


def format_stat(stat: Stat, kind: str, missing: str = "-") -> str:
    """``3.2100`` for one run; ``3.2100 ± 0.0123 (3)`` for a group; ``(2 of 3)`` when some runs
    of the group have no value."""
    if stat.n == 0:
        return missing
    text = format_value(stat.mean, kind)  # type: ignore[arg-type]
    if stat.total == 1:
        return text
    if stat.std:  # a spread; identical values (parameters, tokens of equal budgets) show none
        text += f" ± {format_value(stat.std, kind)}"
    return text + (f" ({stat.n})" if stat.n == stat.total else f" ({stat.n} of {stat.total})")


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.2f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
