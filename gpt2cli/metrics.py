"""Run metrics: the metrics.jsonl writer, throughput and model FLOPs utilisation.

One JSON object per line: training rows (``kind: "train"``) at log intervals and evaluation rows
(``kind: "eval"``). `gpt2 compare` reads this file, spec.json and status.json (whose reader
lives here, away from torch, for that reason).
"""

from __future__ import annotations

import json
import math
import os
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
    """Appends JSON rows to metrics.jsonl, flushing each so a crash loses at most one row."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        # Strict JSON: NaN and Infinity are not JSON (jq, JavaScript and most readers refuse or
        # mangle them), so a non-finite number is written as null; read_metrics gives it back
        # as NaN for the loss columns.
        self._file.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
