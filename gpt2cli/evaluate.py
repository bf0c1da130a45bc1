"""Evaluation: mean next-token loss over deterministic, non-overlapping windows.

The windows are the split's first ``max_tokens // seq_len`` windows (at least one) in order, so
two checkpoints (or two runs) are scored on exactly the same tokens. Under several processes each
rank scores every world_size-th window; ranks with fewer windows run padding batches of weight 0 so
that every rank makes the same number of forward passes (FSDP gathers weights collectively): see
gpt2cli.data.loader.eval_batches, which yields the batches and their weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gpt2cli.data.loader import count_windows, eval_batches, out_of_vocabulary
from gpt2cli.errors import UserError
from gpt2cli.quantize import quantize_int8
from gpt2cli.specs import DEFAULT_LOSS_CHUNK, EvaluateSpec


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    strategy=None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_chunk: int = DEFAULT_LOSS_CHUNK,
    vocab_size: int | None = None,
    device: torch.device | None = None,
) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on the evaluation windows of ``tokens``."""
    stats = evaluate_sums(model, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                          strategy=strategy, autocast=autocast, loss_chunk=loss_chunk, vocab_size=vocab_size,
                          device=device)
    return stats[0] / stats[1]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it came in, also
    when the block fails (a bad batch, out of memory)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def evaluate_sums(model, tokens, *, seq_len, batch_size, max_tokens=None, strategy=None, autocast=None,
                  loss_chunk=DEFAULT_LOSS_CHUNK, on_windows: Callable[[int], None] | None = None,
                  vocab_size: int | None = None, device: torch.device | None = None):
    """(summed loss, token count) over the evaluation windows, reduced over ranks. ``loss_chunk``:
    see GPT.forward (0 for a compiled model, whose compiler fuses the loss). ``vocab_size``: ids
    at or above it are refused (see gpt2cli.data.loader). ``on_windows`` gets
    this rank's windows handed to the model so far, after every batch (no device sync: on a GPU it
    can run a few batches ahead of the arithmetic). ``device``: where the batches go; default: the
    parameters' device (not the compute device under FSDP with CPU offload: training passes it)."""
    rank = strategy.rank if strategy is not None else 0
    world = strategy.world_size if strategy is not None else 1
    device = device or next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    windows_done = 0
    with evaluation_mode(model):
        for x, y, weight in eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                                         rank=rank, world_size=world, device=device, vocab_size=vocab_size):
            with autocast() if autocast else contextlib.nullcontext():
                loss = model(x, targets=y, reduction="sum", loss_chunk=loss_chunk)
            loss_sum += loss.double() * weight  # padding batches (weight 0): same collectives, no count
            count += y.numel() * weight
            if on_windows is not None:
                windows_done += y.shape[0] if weight else 0
                on_windows(windows_done)
    totals = torch.stack([loss_sum, count])
    if strategy is not None:
        totals = strategy.all_reduce_sum(totals)
    loss_total, token_total = totals.tolist()
    return loss_total, token_total


# ------------------------------------------------------------------ gpt2 eval: many checkpoints


@dataclass
class EvalRow:
    checkpoint: str  # as given
    source: str  # what it turned out to be
    params: int
    loss: float  # mean nats per target token
    perplexity: float
    bits_per_byte: float
    tokens: int
    tokens_per_s: float
    seconds: float
    # Why loss, perplexity and bits per byte are not usable (a NaN/inf loss); None when they are.
    # A diverged model still gets its row, so the other models' finished scores are never lost.
    error: str | None = None


class EvalProgress(Protocol):
    """What evaluate_checkpoints tells its caller while it works (the CLI draws it on stderr)."""

    # The report less its results, after every check; header["unit"] names what is counted below
    # (windows, or examples for a downstream task). A downstream task also calls a
    # ``download(done, total)`` method where the progress object has one, while its data file is
    # first fetched (bytes so far, and the size when the server gives it).
    def start(self, header: dict[str, Any]) -> None: ...
    def model(self, index: int, checkpoint: str, windows: int) -> None: ...  # before scoring model ``index``
    def windows_done(self, windows: int) -> None: ...  # the current model's windows (examples) scored so far


def evaluate_checkpoints(spec: EvaluateSpec, progress: EvalProgress | None = None) -> dict[str, Any]:
    """Score every checkpoint of ``spec`` on the same windows (or, with a downstream task, the same
    examples: gpt2cli.hellaswag, gpt2cli.lambada); returns the report (the JSON that ``--format
    json`` prints): data, split, seq_len, windows, tokens, bytes and one row per checkpoint. A
    model whose loss is not finite does not stop the others: its row holds the NaN/inf values and
    says so in ``error``; the caller decides how to end."""
    from gpt2cli.data import TokenFolder, default_data_dir
    from gpt2cli.loading import load_model
    from gpt2cli.parallel.base import resolve_device
    from gpt2cli.tokenizer import token_byte_lengths
    from gpt2cli.train import autocast_context, resolve_dtype

    if spec.task == "hellaswag":
        from gpt2cli.hellaswag import evaluate_hellaswag

        return evaluate_hellaswag(spec, progress)
    if spec.task == "lambada":
        from gpt2cli.lambada import evaluate_lambada

        return evaluate_lambada(spec, progress)
    if not spec.checkpoints:
        raise UserError("no checkpoint to evaluate", "pass one or more checkpoints, run folders or GPT-2 folders")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    folder = TokenFolder(Path(spec.data) if spec.data else default_data_dir())
    tokens = folder.tokens(spec.split)

    models = [load_model(c, device="cpu") for c in spec.checkpoints]
    seq_len = spec.seq_len or min(m.spec.block_size for m in models)
    for name, m in zip(spec.checkpoints, models, strict=True):
        if seq_len > m.spec.block_size:
            raise UserError(
                f"--seq-len {seq_len} exceeds the context of {name!r} ({m.spec.block_size})",
                "use a --seq-len every model can take",
            )
    windows = count_windows(len(tokens), seq_len, spec.tokens)
    if windows == 0:
        raise UserError(
            f"split {spec.split!r} of {str(folder.path)!r} has {len(tokens):,} tokens, fewer than one window "
            f"of {seq_len + 1:,}",
            "use more data or a shorter --seq-len",
        )
    used = np.asarray(tokens[: windows * seq_len + 1])
    targets = used[1:]
    top = int(used.max())
    byte_lengths = token_byte_lengths()
    if top >= len(byte_lengths):  # bits per byte needs every id's bytes, as the tokenizer has them
        raise out_of_vocabulary(top, len(byte_lengths), "the GPT-2 tokenizer's")
    n_bytes = int(byte_lengths[targets.astype(np.int64)].sum())
    for name, m in zip(spec.checkpoints, models, strict=True):
        if top >= m.spec.vocab_size:
            raise UserError(
                f"the data holds token id {top:,}, outside the vocabulary of {name!r} ({m.spec.vocab_size:,})",
                "evaluate on data made with the model's tokenizer",
            )

    header = {
        "task": "loss",
        "unit": "windows",
        "data": str(folder.path),
        "split": spec.split,
        "seq_len": seq_len,
        "windows": windows,
        "tokens": windows * seq_len,
        "bytes": n_bytes,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": spec.quantize,
    }
    if progress is not None:
        progress.start(header)

    rows: list[EvalRow] = []
    for index, (name, loaded) in enumerate(zip(spec.checkpoints, models, strict=True)):
        if progress is not None:
            progress.model(index, name, windows)
        params = sum(p.numel() for p in loaded.model.parameters())
        if spec.quantize == "int8":
            quantize_int8(loaded.model)  # on the CPU, before the move: the float weights never reach the device
        model = loaded.model.to(device)
        t0 = time.perf_counter()
        loss_sum, count = evaluate_sums(
            model, tokens, seq_len=seq_len, batch_size=spec.batch_size, max_tokens=spec.tokens,
            autocast=lambda: autocast_context(device, dtype),
            on_windows=progress.windows_done if progress is not None else None,
        )
        seconds = time.perf_counter() - t0
        loaded.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        loss = loss_sum / count
        rows.append(EvalRow(
            checkpoint=name,
            source=loaded.source,
            params=params,
            loss=loss,
            perplexity=_perplexity(loss),
            bits_per_byte=loss_sum / math.log(2) / n_bytes if n_bytes else math.nan,
            tokens=int(count),
            tokens_per_s=count / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            error=None if math.isfinite(loss) else f"the loss is not finite ({loss})",
        ))
    return {**header, "results": [asdict(r) for r in rows]}


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan  # honest: a NaN loss has no perplexity, not an infinite one
    return math.exp(loss) if loss < 700 else math.inf  # math.exp overflows (raises) past ~709.8
