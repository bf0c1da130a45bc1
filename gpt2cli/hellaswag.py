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
a file it is downloaded once from the authors' repository into the gpt2 cache
(gpt2cli.downstream); nothing is downloaded when a file is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpt2cli import downstream
from gpt2cli.downstream import Autocast, batches, fit_to_context
from gpt2cli.errors import UserError
from gpt2cli.evaluate import evaluation_mode

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FORMAT_HINT = "a HellaSwag .jsonl file holds one JSON object per line with ctx, endings and label"


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
    return downstream.read_jsonl(path, _parse_example, limit=limit, name=name, hint=FORMAT_HINT)


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


# ------------------------------------------------------------------------------------ scoring


def encode_examples(examples: list[Example], block_size: int) -> list[EncodedExample]:
    """Token rows of every example for a model of context ``block_size`` (see the module's doc)."""
    from gpt2cli.tokenizer import encode

    encoded = []
    for example in examples:
        context = encode(example.context)
        fitted = [fit_to_context(context, encode(" " + ending), block_size) for ending in example.endings]
        encoded.append(EncodedExample(rows=tuple(f[0] for f in fitted), starts=tuple(f[1] for f in fitted),
                                      label=example.label, truncated=any(f[2] for f in fitted)))
    return encoded


def score_examples(model: nn.Module, encoded: list[EncodedExample], *, batch_size: int, autocast: Autocast = None,
                   on_examples=None, forwards: int | None = None, device: torch.device | None = None) -> HellaSwagScore:
    """Accuracy of ``model`` on the examples, ``batch_size`` examples (all their rows) per forward.
    ``forwards``: make that many forward passes in all, the ones past the examples on a dummy row
    whose result is dropped (FSDP: every rank must gather the weights as often as the others)."""
    score = HellaSwagScore()
    made = 0
    with evaluation_mode(model):
        for batch in batches(encoded, batch_size):
            made += 1
            rows = [row for example in batch for row in example.rows]
            starts = [start for example in batch for start in example.starts]
            scores = downstream.continuation_scores(model, rows, starts, autocast=autocast, device=device)
            first = 0
            for example in batch:
                n = len(example.rows)
                total = scores.sums[first : first + n]
                mean = total / scores.counts[first : first + n]
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
            downstream.continuation_scores(model, [np.zeros(2, dtype=np.int64)], [1], autocast=autocast, device=device)
    return score


def score_on_ranks(model: nn.Module, encoded: list[EncodedExample], *, batch_size: int, strategy,
                   autocast: Autocast = None, device: torch.device | None = None) -> HellaSwagScore:
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


# ------------------------------------------------------------------ gpt2 eval --task hellaswag


def _result_row(model: nn.Module, encoded: list[EncodedExample], **kwargs) -> dict[str, Any]:
    score = score_examples(model, encoded, **kwargs)
    error = f"{score.nonfinite:,} of {score.examples:,} examples have NaN/inf scores" if score.nonfinite else None
    return {"examples": score.examples, "acc": score.acc if not error else math.nan,
            "acc_norm": score.acc_norm if not error else math.nan, "correct": score.correct,
            "correct_norm": score.correct_norm, "truncated": score.truncated, "error": error}


TASK = downstream.Task(name="hellaswag", title="HellaSwag", published_url=HELLASWAG_VAL_URL,
                       read=read_examples, encode=encode_examples, score=_result_row)


def evaluate_hellaswag(spec, progress=None) -> dict[str, Any]:
    """``gpt2 eval --task hellaswag``: see gpt2cli.downstream.evaluate_task."""
    return downstream.evaluate_task(TASK, spec, progress)
