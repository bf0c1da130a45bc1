"""Run metrics: the metrics.jsonl writer, throughput and model FLOPs utilisation.

One JSON object per line: training rows (``kind: "train"``) at log intervals and evaluation rows
(``kind: "eval"``). `gpt2 compare` reads this file, spec.json and status.json (whose reader
lives here, away from torch, for that reason).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

# Dense bf16/fp16 peak FLOP/s by accelerator name (substring of torch.cuda.get_device_name).
# fp32 without TF32 is far lower; MFU is reported against the bf16 peak, as nanoGPT and
# torchtitan do, and only where the peak is known.
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS_BF16.items():
        if key in device_name:
            return value
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak (None when the peak is unknown)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


class MetricsWriter:
    """Appends JSON rows to metrics.jsonl, flushing each so a crash loses at most one row, and
    hands each row to its mirrors (:class:`TensorBoardWriter`)."""

    def __init__(self, path: Path, enabled: bool = True, mirrors: tuple[Any, ...] = ()) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._mirrors = mirrors if enabled else ()

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        # Strict JSON: NaN and Infinity are not JSON (jq, JavaScript and most readers refuse or
        # mangle them), so a non-finite number is written as null; read_metrics gives it back
        # as NaN for the loss columns.
        self._file.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")
        self._file.flush()
        for mirror in self._mirrors:
            mirror.write(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for mirror in self._mirrors:
            mirror.close()
        self._mirrors = ()


TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl columns -> the names of their curves in TensorBoard and W&B, by row kind.
MIRRORED_SCALARS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
              ("tokens_per_s", "train/tokens_per_s"), ("mfu", "train/mfu"),
              ("peak_mem_bytes", "train/peak_mem_bytes"), ("peak_rss_bytes", "train/peak_rss_bytes")),
    "eval": (("val_loss", "val/loss"), ("val_ppl", "val/ppl"),
             ("hellaswag_acc", "hellaswag/acc"), ("hellaswag_acc_norm", "hellaswag/acc_norm")),
}


def mirrored_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers that the mirrors log, under their curve names."""
    values = {}
    for column, tag in MIRRORED_SCALARS.get(str(row.get("kind")), ()):
        value = row.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[tag] = value
    return values


def package_missing(name: str) -> bool:
    """Whether the optional package ``name`` (tensorboard, wandb) is not installed."""
    import importlib.util

    return importlib.util.find_spec(name) is None


class TensorBoardWriter:
    """The metrics rows as TensorBoard scalars (``RUN/tensorboard/``; ``tensorboard --logdir
    runs`` shows every run), written beside metrics.jsonl, which stays the record.

    ``purge_step``: a resume from the checkpoint of step S passes S + 1, and TensorBoard hides the
    events an earlier attempt wrote from there on, as :func:`truncate_metrics` drops those rows.
    Events are flushed with every row, so a crash loses what metrics.jsonl loses."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, spec_json: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if spec_json is not None:
            self._writer.add_text("spec", f"```json\n{spec_json}\n```", 0)
            self._writer.flush()

    def write(self, row: dict[str, Any]) -> None:
        kind, step = row.get("kind"), row.get("step")
        for tag, value in mirrored_scalars(row).items():
            self._writer.add_scalar(tag, value, step)
        if kind == "resume":
            changed = ", ".join(f"{name}: {old} -> {new}" for name, (old, new) in row.get("changed", {}).items())
            self._writer.add_text("resume", f"resumed at step {step} with {changed}", step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


WANDB_ID_FILE = "wandb-id"  # in the run folder: the W&B run a resume continues
WANDB_DEFAULT_PROJECT = "gpt2"


class WandbWriter:
    """The metrics rows logged to a Weights & Biases run, beside metrics.jsonl (which stays the
    record). The W&B run's id is kept in ``RUN/wandb-id``: a resume continues the same W&B run
    (``resume="allow"``). W&B keeps one value per step and never goes back, so the rows that a
    resume from an older checkpoint logs again, up to the step the W&B run had reached, are left
    out rather than sent to be refused. W&B's capture of the console is off: the progress bar's
    redraws would fill its log. W&B's own lines (where the run is, how to sync an offline one) go
    to stderr."""

    def __init__(self, run_dir: Path, *, project: str | None, name: str, config: dict[str, Any],
                 quiet: bool = False) -> None:
        import wandb

        id_path = run_dir / WANDB_ID_FILE
        run_id = id_path.read_text(encoding="utf-8").strip() if id_path.exists() else None
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
            staging = id_path.with_name(f".{WANDB_ID_FILE}.tmp-{os.getpid()}")
            staging.write_text(run_id + "\n", encoding="utf-8")
            os.replace(staging, id_path)
        self._run = wandb.init(  # its files go into RUN/wandb/
            project=project or os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT, name=name, id=run_id,
            resume="allow", dir=str(run_dir), config=config,
            settings=wandb.Settings(console="off", silent=quiet),  # --quiet: not even W&B's banner
        )
        self._floor = int(getattr(self._run, "step", 0) or 0)  # steps below it were logged before

    def write(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        values = mirrored_scalars(row)
        if not values or not isinstance(step, int) or step < self._floor:
            return
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


# Columns that read_metrics gives back as NaN where the file holds null (a non-finite value).
NONFINITE_AS_NAN = ("loss", "grad_norm", "val_loss", "val_ppl")


def finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after ``last_step`` (written after the checkpoint a resume starts from), so
    that the resumed run's file reads like an uninterrupted one."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if int(row.get("step", 0)) <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows of a metrics.jsonl (a torn last line is ignored)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in NONFINITE_AS_NAN:
            if key in row and row[key] is None:
                row[key] = math.nan
        rows.append(row)
    return rows


STATUS_NAME = "status.json"


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's status.json (see gpt2cli.train.write_status), or None when absent or damaged."""
    try:
        record = json.loads((Path(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
