"""What the downstream tasks of `gpt2 eval` (HellaSwag, LAMBADA) share: their data fetched once
into the cache, a text and its continuation cut to the model's context, the continuation's tokens
scored in one padded forward pass, and the loop over checkpoints that makes the report.

A task module (gpt2cli.hellaswag, gpt2cli.lambada) says how its file reads, how an example
becomes token rows, and how a model's scores become a result row; :func:`evaluate_task` does the
rest the same way for every task: the data is read (and checked) before any model is loaded, all
models are loaded and checked before the first is scored, and every model is scored on the same
examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.errors import UserError

DOWNLOAD_TIMEOUT_S = 60.0
PUBLISHED_SET = "val"  # what --task-data / --hellaswag call a task's published set (a file named so: ./val)

# (bytes done, total bytes or None when the server does not say)
DownloadProgress = Callable[[int, int | None], None]
Autocast = Callable[[], contextlib.AbstractContextManager] | None


# ------------------------------------------------------------------------------------ the data


def fetch(source: str | None, *, published_url: str, what: str, check: Callable[[Path, str], Any],
          on_download: DownloadProgress | None = None) -> Path:
    """The local file of ``source``: a path as it is, a URL (http, https, file) downloaded once into
    the cache, None or ``val`` the task's published set (``published_url``). ``what`` names the
    task in errors; ``check(path, name)`` reads a download (a UserError if it is not the task's
    data) before it enters the cache."""
    source = published_url if source in (None, "", PUBLISHED_SET) else source
    if "://" in source:
        return download(source, check, on_download)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{what} file {source!r} does not exist",
                        "give a .jsonl file or a URL, or leave --task-data out to use the published set")
    if path.is_dir():
        raise UserError(f"{what} data {source!r} is a folder", "give the .jsonl file itself")
    return path


def cached_path(url: str) -> Path:
    """Where a download of ``url`` is kept: named by the URL's file name and a hash of the whole URL."""
    from gpt2cli.data.prepare import cache_root

    name = url.rstrip("/").rsplit("/", 1)[-1] or "data.jsonl"
    return cache_root() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def download(url: str, check: Callable[[Path, str], Any], on_download: DownloadProgress | None = None) -> Path:
    """``url``'s file, downloaded into the cache on first use. ``check`` reads it before it is
    renamed into place, so an error page or a cut-off transfer never becomes the cached copy."""
    from gpt2cli.fsutil import fsync_dir, remove_stale_staging, staging_path

    target = cached_path(url)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = staging_path(target)
    try:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(staging, "wb") as f:
                length = response.headers.get("Content-Length") if response.headers else None
                total = int(length) if length and length.isdigit() else None
                done = 0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if on_download is not None:
                        on_download(done, total)
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UserError(f"could not download {url}: {reason}",
                            "check the connection, or download the file yourself and pass --task-data FILE") from exc
        check(staging, url)
        os.replace(staging, target)
        fsync_dir(target.parent)
    finally:
        staging.unlink(missing_ok=True)
    return target


def read_jsonl(path: Path, parse: Callable[[str, str], Any], *, limit: int | None, name: str | None, hint: str,
               what: str = "examples") -> list[Any]:
    """``parse(line, "file:line")`` of the first ``limit`` non-blank lines (all by default) of a
    .jsonl file; ``parse`` raises a UserError for a line that is not the task's. ``name``: the file
    as errors name it (the URL of a download being checked); ``hint``: the format, for errors."""
    name = name or str(path)
    items: list[Any] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(items) >= limit:
                    break
                if line.strip():
                    items.append(parse(line, f"{name}:{number}"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})", hint) from exc
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror or exc}", "check the path and its permissions") from exc
    if not items:
        raise UserError(f"{name} holds no {what}", hint)
    return items


# ------------------------------------------------------------------------------------ token rows


def fit_to_context(context: list[int], continuation: list[int], block_size: int) -> tuple[np.ndarray, int, bool]:
    """(row, start, truncated): context + continuation as one token row, its last ``block_size``
    tokens when longer (the context is cut from the left, the continuation kept whole where it
    fits); ``start`` is the index of the first scored (continuation) token, at least 1, since the
    first token has nothing before it to be scored on."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 to score a token after another, not {block_size}")
    row = np.asarray(context + continuation, dtype=np.int64)
    start, truncated = len(context), False
    if len(row) > block_size:
        cut = len(row) - block_size
        row, start, truncated = row[cut:], start - cut, True
    return row, max(start, 1), truncated


@dataclass
class ContinuationScores:
    """Per row: the summed loss of its scored tokens, how many there were, and whether every one of
    them was the model's most likely token (greedy decoding would have produced the continuation)."""

    sums: torch.Tensor  # float64
    counts: torch.Tensor  # float64
    greedy: torch.Tensor  # bool


@torch.no_grad()
def continuation_scores(model: nn.Module, rows: Sequence[np.ndarray], starts: Sequence[int], *,
                        autocast: Autocast = None, device: torch.device | None = None) -> ContinuationScores:
    """Score each row's tokens from its start on, in one forward pass: the rows are padded on the
    right (causal attention: padding never reaches an earlier token), and the output layer runs only
    at the positions that predict a scored token (``GPT.forward(logits_at=...)``). ``device``: where
    the tokens go; default: the parameters' device."""
    device = device or next(model.parameters()).device
    width = max(len(r) for r in rows)
    x = np.zeros((len(rows), width), dtype=np.int64)
    row_index, position = [], []
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        x[i, : len(row)] = row
        row_index.append(np.full(len(row) - start, i))
        position.append(np.arange(start, len(row)))  # the scored tokens
    row_of = torch.from_numpy(np.concatenate(row_index)).to(device)
    scored = torch.from_numpy(np.concatenate(position)).to(device)
    tokens = torch.from_numpy(x).to(device)
    with autocast() if autocast else contextlib.nullcontext():
        logits = model(tokens, logits_at=(row_of, scored - 1))  # (scored tokens, vocab): position t-1 predicts t
    targets = tokens[row_of, scored]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, losses.double())
    counts = torch.bincount(row_of, minlength=len(rows))
    hits = torch.bincount(row_of, weights=(logits.argmax(dim=-1) == targets).double(), minlength=len(rows))
    return ContinuationScores(sums.cpu(), counts.double().cpu(), (hits == counts).cpu())


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------ gpt2 eval --task NAME


@dataclass(frozen=True)
class Task:
    """How `gpt2 eval` runs one downstream task (see :func:`evaluate_task`)."""

    name: str  # hellaswag, lambada
    title: str  # HellaSwag, LAMBADA: for errors and the report
    published_url: str
    # (file, limit, *, name=file as errors call it) -> examples; a UserError for a bad file
    read: Callable[..., list[Any]]
    encode: Callable[[list[Any], int], list[Any]]  # (examples, block_size) -> encoded examples
    # (model, encoded, batch_size, autocast, on_examples) -> a row's results: the task's metrics,
    # examples, truncated and error (None, or why the metrics are not usable)
    score: Callable[..., dict[str, Any]]

    def fetch(self, source: str | None, on_download: DownloadProgress | None = None) -> Path:
        """The local file of ``source`` (see :func:`fetch`): a path, a URL downloaded once into the
        cache, or None / ``val`` for the task's published set; a download is read as the task's
        examples before it is kept."""
        return fetch(source, published_url=self.published_url, what=self.title,
                     check=lambda path, name: self.read(path, None, name=name), on_download=on_download)


def evaluate_task(task: Task, spec, progress=None) -> dict[str, Any]:
    """``gpt2 eval --task NAME``: every checkpoint of ``spec`` (an EvaluateSpec) on the same
    examples; returns the report that ``--format json`` prints. ``progress``: a
    gpt2cli.evaluate.EvalProgress (its unit here is examples)."""
    from gpt2cli.loading import load_model
    from gpt2cli.parallel.base import resolve_device
    from gpt2cli.quantize import quantize_int8
    from gpt2cli.tokenizer import VOCAB_SIZE
    from gpt2cli.train import autocast_context, resolve_dtype

    if not spec.checkpoints:
        raise UserError("no checkpoint to evaluate", "pass one or more checkpoints, run folders or GPT-2 folders")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    path = task.fetch(spec.task_data, getattr(progress, "download", None))
    examples = task.read(path, spec.examples)  # before the models: a bad file fails at once

    models = [load_model(c, device="cpu") for c in spec.checkpoints]
    for name, m in zip(spec.checkpoints, models, strict=True):
        if m.spec.vocab_size < VOCAB_SIZE:
            raise UserError(
                f"{name!r} has a vocabulary of {m.spec.vocab_size:,} tokens, fewer than the GPT-2 tokenizer's "
                f"{VOCAB_SIZE:,} that {task.title}'s text is encoded with",
                "score a model with the GPT-2 vocabulary",
            )
    header = {
        "task": task.name,
        "data": spec.task_data if spec.task_data not in (None, "", PUBLISHED_SET) else task.published_url,
        "file": str(path),
        "examples": len(examples),
        "unit": "examples",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": spec.quantize,
    }
    if progress is not None:
        progress.start(header)

    encoded_for: dict[int, list[Any]] = {}  # by block_size: models of one size share the rows
    rows: list[dict[str, Any]] = []
    for index, (name, loaded) in enumerate(zip(spec.checkpoints, models, strict=True)):
        if progress is not None:
            progress.model(index, name, len(examples))
        block_size = loaded.spec.block_size
        if block_size not in encoded_for:
            encoded_for[block_size] = task.encode(examples, block_size)
        params = sum(p.numel() for p in loaded.model.parameters())
        if spec.quantize == "int8":
            quantize_int8(loaded.model)  # on the CPU, before the move (as gpt2 eval's loss task)
        model = loaded.model.to(device)
        t0 = time.perf_counter()
        results = task.score(model, encoded_for[block_size], batch_size=spec.batch_size,
                             autocast=lambda: autocast_context(device, dtype),
                             on_examples=progress.windows_done if progress is not None else None)
        seconds = time.perf_counter() - t0
        loaded.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"checkpoint": name, "source": loaded.source, "params": params, **results,
                     "examples_per_s": results["examples"] / seconds if seconds > 0 else 0.0, "seconds": seconds})
    return {**header, "results": rows}
