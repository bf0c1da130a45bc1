"""LAMBADA: predict a passage's last word (``gpt2 eval --task lambada``), the zero-shot benchmark of
the GPT-2 paper.

Each passage is split at its last space: the model reads the text before it and the target is
``" " + last word`` (one or more tokens). As lm-evaluation-harness scores ``lambada_openai``:

- ``acc``: the target counts as predicted when, at every one of its tokens, that token is the
  model's most likely one given everything before it (greedy decoding would produce the word);
- ``ppl``: exp of the mean, over passages, of the target's summed loss (a per-word perplexity).

The data is OpenAI's version of the test set (``lambada_test.jsonl``: 5,153 passages, one
``{"text": ...}`` per line, detokenised as GPT-2 reads text), downloaded once into the cache
(gpt2cli.downstream) unless a file is given. The GPT-2 paper's own figures (Table 3: accuracy
45.99 for 117M, 63.24 for 1.5B) come with a stop-word filter on the predicted word, which this
protocol does not have; lm-evaluation-harness's figures (without it) are far lower, so compare
only figures of one protocol.

A passage longer than the model's context keeps its last ``block_size`` tokens (the start of the
passage is cut; the target stays whole), counted as ``truncated``.
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

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
FORMAT_HINT = 'a LAMBADA .jsonl file holds one JSON object per line with a "text" of two or more words'


@dataclass(frozen=True)
class Passage:
    context: str  # the text up to its last space
    target: str  # " " + the last word


@dataclass(frozen=True)
class EncodedPassage:
    row: np.ndarray  # context + target tokens, cut to the model's context
    start: int  # index of the first target token; at least 1
    truncated: bool


@dataclass
class LambadaScore:
    examples: int = 0
    correct: int = 0  # every target token was the model's most likely one
    loss_sum: float = 0.0  # summed over passages: each target's summed loss (nats)
    truncated: int = 0
    nonfinite: int = 0  # passages with a NaN/inf loss (counted as wrong, left out of ppl)

    @property
    def acc(self) -> float:
        return self.correct / self.examples if self.examples else math.nan

    @property
    def ppl(self) -> float:
        scored = self.examples - self.nonfinite
        if not scored:
            return math.nan
        mean = self.loss_sum / scored
        return math.exp(mean) if mean < 700 else math.inf


def read_passages(path: Path, limit: int | None = None, *, name: str | None = None) -> list[Passage]:
    """The first ``limit`` passages (all by default) of a LAMBADA .jsonl file; a line that is not a
    passage is a UserError naming the file (or ``name``) and the line."""
    return downstream.read_jsonl(path, _parse_passage, limit=limit, name=name, hint=FORMAT_HINT, what="passages")


def _parse_passage(line: str, where: str) -> Passage:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not JSON ({exc.msg})", FORMAT_HINT) from exc
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{where} has no text (a JSON object with a string \"text\")", FORMAT_HINT)
    context, space, word = text.strip().rpartition(" ")
    if not space or not context or not word:
        raise UserError(f"{where}: the text has no last word after a space to predict", FORMAT_HINT)
    return Passage(context=context, target=" " + word)


def encode_passages(passages: list[Passage], block_size: int) -> list[EncodedPassage]:
    from gpt2cli.tokenizer import encode

    encoded = []
    for passage in passages:
        row, start, truncated = fit_to_context(encode(passage.context), encode(passage.target), block_size)
        encoded.append(EncodedPassage(row=row, start=start, truncated=truncated))
    return encoded


def score_passages(model: nn.Module, encoded: list[EncodedPassage], *, batch_size: int, autocast: Autocast = None,
                   on_examples=None, device: torch.device | None = None) -> LambadaScore:
    """Accuracy and perplexity of ``model`` on the passages, ``batch_size`` passages per forward."""
    score = LambadaScore()
    with evaluation_mode(model):
        for batch in batches(encoded, batch_size):
            scores = downstream.continuation_scores(model, [p.row for p in batch], [p.start for p in batch],
                                                    autocast=autocast, device=device)
            for i, passage in enumerate(batch):
                score.examples += 1
                score.truncated += passage.truncated
                loss = float(scores.sums[i])
                if not math.isfinite(loss):
                    score.nonfinite += 1
                    continue
                score.loss_sum += loss
                score.correct += bool(scores.greedy[i])
            if on_examples is not None:
                on_examples(score.examples)
    return score


def _result_row(model: nn.Module, encoded: list[EncodedPassage], **kwargs) -> dict[str, Any]:
    score = score_passages(model, encoded, **kwargs)
    error = f"{score.nonfinite:,} of {score.examples:,} passages have a NaN/inf loss" if score.nonfinite else None
    return {"examples": score.examples, "acc": score.acc if not error else math.nan,
            "ppl": score.ppl if not error else math.nan, "correct": score.correct, "truncated": score.truncated,
            "error": error}


TASK = downstream.Task(name="lambada", title="LAMBADA", published_url=LAMBADA_URL, read=read_passages,
                       encode=encode_passages, score=_result_row)


def evaluate_lambada(spec, progress=None) -> dict[str, Any]:
    """``gpt2 eval --task lambada``: see gpt2cli.downstream.evaluate_task."""
    return downstream.evaluate_task(TASK, spec, progress)
