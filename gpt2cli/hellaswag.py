"""HellaSwag: commonsense sentence completion, scored completion style (``gpt2 eval --task hellaswag``).

Each example is a context and four candidate endings, one of them right. The model reads the
context followed by each ending (``" " + ending``, as GPT-2's tokenizer sees a new word) and the
ending's tokens are scored by their cross-entropy given everything before them. The prediction
is the ending the model finds most likely:

- ``acc``: the ending with the lowest summed loss (log-likelihood of the whole ending);
- ``acc_norm``: the lowest mean loss per ending token, which does not favour short endings.

This is the protocol of llm.c's and build-nanogpt's ``hellaswag.py`` (their docstrings give GPT-2
124M acc 0.2859, acc_norm 0.2955 on the 10,042 validation examples, and GPT-2 XL 0.3842 /
0.4893). lm-evaluation-harness scores multiple-choice style, with its own text clean-up and a
per-character normalisation, and reports other figures (28.92 / 31.14 for GPT-2 124M), so only
figures from the same protocol compare.

A row longer than the model's context keeps its last ``block_size`` tokens: the context is cut
from the left, the ending stays whole where it fits. Such examples are counted (``truncated``) so
that a small model's figure is not mistaken for a full one.

The data is the original ``hellaswag_val.jsonl`` (one JSON object per line with ``ctx``,
``endings`` and ``label``; Hugging Face's copies, whose label is a string, read the same). Without
a file it is downloaded once from the authors' repository into the gpt2 cache; nothing is
downloaded when a file is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.errors import UserError

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VALIDATION_SET = "val"  # what --hellaswag / --task-data call the validation set
FORMAT_HINT = "a HellaSwag .jsonl file holds one JSON object per line with ctx, endings and label"
DOWNLOAD_TIMEOUT_S = 60.0

# (bytes done, total bytes or None when the server does not say)
DownloadProgress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int  # index of the right ending


@dataclass(frozen=True)
class EncodedExample:
    """An example as token rows, one per ending: context + ending, cut to the model's context."""

    rows: tuple[np.ndarray, ...]
    starts: tuple[int, ...]  # per row, the index of its first scored (ending) token; at least 1
    label: int
    truncated: bool  # some row lost context tokens to fit block_size


@dataclass
class HellaSwagScore:
    examples: int = 0
    correct: int = 0  # lowest summed loss was the right ending
    correct_norm: int = 0  # lowest mean loss per token was the right ending
    truncated: int = 0
    nonfinite: int = 0  # examples with a NaN/inf ending score (counted as wrong)

    @property
    def acc(self) -> float:
        return self.correct / self.examples if self.examples else math.nan

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.examples if self.examples else math.nan


# ------------------------------------------------------------------------------------ the data


def read_examples(path: Path, limit: int | None = None, *, name: str | None = None) -> list[Example]:
    """The first ``limit`` examples (all by default) of a HellaSwag .jsonl file; a line that is not
    an example is a UserError naming the file (or ``name``: where it came from) and the line."""
    name = name or str(path)
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(_parse_example(line, f"{name}:{number}"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})", FORMAT_HINT) from exc
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror or exc}", "check the path and its permissions") from exc
    if not examples:
        raise UserError(f"{name} holds no examples", FORMAT_HINT)
    return examples


def _parse_example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not JSON ({exc.msg})", FORMAT_HINT) from exc
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object", FORMAT_HINT)
    context = row.get("ctx")
    if context is None and isinstance(row.get("ctx_a"), str):  # ctx is ctx_a + " " + ctx_b (the dataset's README)
        context = " ".join(part for part in (row["ctx_a"], row.get("ctx_b") or "") if part)
    if not isinstance(context, str) or not context.strip():
        raise UserError(f"{where} has no context (a non-empty string ctx)", FORMAT_HINT)
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise UserError(f"{where}: endings must be a list of two or more non-empty strings", FORMAT_HINT)
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # Hugging Face's copies store "0".."3"
    if label is None or label == "":
        raise UserError(f"{where} has no label", "the test split has none: score the validation split")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise UserError(f"{where}: label {label!r} is not the index of one of its {len(endings)} endings",
                        FORMAT_HINT)
    return Example(context=context, endings=tuple(endings), label=label)


def resolve_source(source: str | None, on_download: DownloadProgress | None = None) -> Path:
    """The local file of ``source``: a path as it is, a URL (http, https, file) downloaded once into
    the cache, None or ``val`` the validation set's URL (a file named val: ``./val``)."""
    source = HELLASWAG_VAL_URL if source in (None, "", VALIDATION_SET) else source
    if "://" in source:
        return download(source, on_download)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"HellaSwag file {source!r} does not exist",
                        "give a .jsonl file or a URL, or leave --task-data out to use the validation set")
    if path.is_dir():
        raise UserError(f"HellaSwag data {source!r} is a folder", "give the .jsonl file itself")
    return path


def cached_path(url: str) -> Path:
    """Where a download of ``url`` is kept: named by the URL's file name and a hash of the whole URL."""
    from gpt2cli.data.prepare import cache_root

    name = url.rstrip("/").rsplit("/", 1)[-1] or "hellaswag.jsonl"
    return cache_root() / "hellaswag" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def download(url: str, on_download: DownloadProgress | None = None) -> Path:
    """``url``'s file, downloaded into the cache on first use. It is read as examples before it is
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
        read_examples(staging, name=url)
        os.replace(staging, target)
        fsync_dir(target.parent)
    finally:
        staging.unlink(missing_ok=True)
    return target


# ------------------------------------------------------------------------------------ scoring


def encode_examples(examples: list[Example], block_size: int) -> list[EncodedExample]:
    """Token rows of every example for a model of context ``block_size`` (see the module's doc)."""
    from gpt2cli.tokenizer import encode

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 to score a token after another, not {block_size}")
    encoded = []
    for example in examples:
        context = encode(example.context)
        rows, starts, truncated = [], [], False
        for ending in example.endings:
            row = np.asarray(context + encode(" " + ending), dtype=np.int64)
            start = len(context)
            if len(row) > block_size:
                cut = len(row) - block_size
                row, start, truncated = row[cut:], start - cut, True
            rows.append(row)
            starts.append(max(start, 1))  # the first token has nothing before it to be scored on
        encoded.append(EncodedExample(rows=tuple(rows), starts=tuple(starts), label=example.label, truncated=truncated))
    return encoded


@torch.no_grad()
def ending_losses(model: nn.Module, rows: list[np.ndarray], starts: list[int], *,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, scored tokens) of each row's tokens from its start on, in one forward pass:
    the rows are padded on the right (causal attention: padding never reaches an earlier token),
    and the output layer runs only at the positions that predict a scored token. ``device``: where
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
    losses = F.cross_entropy(logits.float(), tokens[row_of, scored], reduction="none")
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, losses.double())
    counts = torch.bincount(row_of, minlength=len(rows)).double()
    return sums.cpu(), counts.cpu()


def score_examples(model: nn.Module, encoded: list[EncodedExample], *, batch_size: int,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   on_examples: Callable[[int], None] | None = None, forwards: int | None = None,
                   device: torch.device | None = None) -> HellaSwagScore:
    """Accuracy of ``model`` on the examples, ``batch_size`` examples (all their rows) per forward.
    ``forwards``: make that many forward passes in all, the ones past the examples on a dummy row
    whose result is dropped (FSDP: every rank must gather the weights as often as the others)."""
    was_training = model.training
    model.eval()
    score = HellaSwagScore()
    made = 0
    try:
        for batch in _batches(encoded, batch_size):
            made += 1
            rows = [row for example in batch for row in example.rows]
            starts = [start for example in batch for start in example.starts]
            sums, counts = ending_losses(model, rows, starts, autocast=autocast, device=device)
            first = 0
            for example in batch:
                n = len(example.rows)
                total, mean = sums[first : first + n], sums[first : first + n] / counts[first : first + n]
                first += n
                score.examples += 1
                score.truncated += example.truncated
                if not bool(torch.isfinite(total).all()):
                    score.nonfinite += 1
                    continue
                score.correct += int(total.argmin()) == example.label
                score.correct_norm += int(mean.argmin()) == example.label
            if on_examples is not None:
                on_examples(score.examples)
        for _ in range((forwards or 0) - made):
            ending_losses(model, [np.zeros(2, dtype=np.int64)], [1], autocast=autocast, device=device)
    finally:
        if was_training:
            model.train()
    return score


def score_on_ranks(model: nn.Module, encoded: list[EncodedExample], *, batch_size: int, strategy,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   device: torch.device | None = None) -> HellaSwagScore:
    """score_examples under several processes (training's evaluation): each rank scores every
    world_size-th example, every rank makes as many forward passes as the busiest one, and the
    counts are summed over ranks, so the result is the one process's."""
    world, rank = strategy.world_size, strategy.rank
    busiest = math.ceil(len(encoded) / world)
    score = score_examples(model, encoded[rank::world], batch_size=batch_size, autocast=autocast,
                           forwards=math.ceil(busiest / batch_size), device=device)
    device = device or next(model.parameters()).device
    counts = torch.tensor([score.examples, score.correct, score.correct_norm, score.truncated, score.nonfinite],
                          dtype=torch.float64, device=device)
    examples, correct, correct_norm, truncated, nonfinite = (int(c) for c in strategy.all_reduce_sum(counts).tolist())
    return HellaSwagScore(examples=examples, correct=correct, correct_norm=correct_norm, truncated=truncated,
                          nonfinite=nonfinite)


def _batches(items: list[EncodedExample], size: int) -> Iterator[list[EncodedExample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------ gpt2 eval --task hellaswag


@dataclass
class HellaSwagRow:
    checkpoint: str  # as given
    source: str  # what it turned out to be
    params: int
    examples: int
    acc: float
    acc_norm: float
    correct: int
    correct_norm: int
    truncated: int  # examples cut to fit the model's context
    examples_per_s: float
    seconds: float
    error: str | None = None  # why the accuracies are not usable (NaN/inf scores); None when they are


def evaluate_hellaswag(spec, progress=None) -> dict[str, Any]:
    """``gpt2 eval --task hellaswag``: every checkpoint of ``spec`` (an EvaluateSpec) on the same
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
    on_download = getattr(progress, "download", None)
    path = resolve_source(spec.task_data, on_download)
    examples = read_examples(path, spec.examples)  # before the models: a bad file fails at once

    models = [load_model(c, device="cpu") for c in spec.checkpoints]
    for name, m in zip(spec.checkpoints, models, strict=True):
        if m.spec.vocab_size < VOCAB_SIZE:
            raise UserError(
                f"{name!r} has a vocabulary of {m.spec.vocab_size:,} tokens, fewer than the GPT-2 tokenizer's "
                f"{VOCAB_SIZE:,} that HellaSwag's text is encoded with",
                "score a model with the GPT-2 vocabulary",
            )
    header = {
        "task": "hellaswag",
        "data": spec.task_data or HELLASWAG_VAL_URL,
        "file": str(path),
        "examples": len(examples),
        "unit": "examples",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": spec.quantize,
    }
    if progress is not None:
        progress.start(header)

    encoded_for: dict[int, list[EncodedExample]] = {}  # by block_size: models of one size share the rows
    rows: list[HellaSwagRow] = []
    for index, (name, loaded) in enumerate(zip(spec.checkpoints, models, strict=True)):
        if progress is not None:
            progress.model(index, name, len(examples))
        block_size = loaded.spec.block_size
        if block_size not in encoded_for:
            encoded_for[block_size] = encode_examples(examples, block_size)
        params = sum(p.numel() for p in loaded.model.parameters())
        if spec.quantize == "int8":
            quantize_int8(loaded.model)  # on the CPU, before the move (as gpt2 eval's loss task)
        model = loaded.model.to(device)
        t0 = time.perf_counter()
        score = score_examples(model, encoded_for[block_size], batch_size=spec.batch_size,
                               autocast=lambda: autocast_context(device, dtype),
                               on_examples=progress.windows_done if progress is not None else None)
        seconds = time.perf_counter() - t0
        loaded.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        error = None
        if score.nonfinite:
            error = f"{score.nonfinite:,} of {score.examples:,} examples have NaN/inf scores"
        rows.append(HellaSwagRow(
            checkpoint=name, source=loaded.source, params=params, examples=score.examples,
            acc=score.acc if not error else math.nan, acc_norm=score.acc_norm if not error else math.nan,
            correct=score.correct, correct_norm=score.correct_norm, truncated=score.truncated,
            examples_per_s=score.examples / seconds if seconds > 0 else 0.0, seconds=seconds, error=error,
        ))
    return {**header, "results": [asdict(r) for r in rows]}
