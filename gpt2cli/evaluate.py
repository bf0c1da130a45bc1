"""Evaluation: mean next-token loss over deterministic, non-overlapping windows.

The windows are the split's first ``max_tokens // seq_len`` windows in order, so two checkpoints
(or two runs) are scored on exactly the same tokens. Under several processes each rank scores
every world_size-th window; ranks with fewer windows run padding batches of weight 0 so that
every rank makes the same number of forward passes (FSDP gathers weights collectively).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.errors import UserError


def count_windows(num_tokens: int, seq_len: int, max_tokens: int | None = None) -> int:
    """Non-overlapping windows of seq_len inputs (+1 target token) that fit, capped by max_tokens."""
    n = (num_tokens - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return max(n, 0)


def window_batch(tokens: np.ndarray, starts: list[int], seq_len: int, device: torch.device):
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(rows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]


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
) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on the evaluation windows of ``tokens``."""
    stats = evaluate_sums(model, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                          strategy=strategy, autocast=autocast)
    return stats[0] / stats[1]


@torch.no_grad()
def evaluate_sums(model, tokens, *, seq_len, batch_size, max_tokens=None, strategy=None, autocast=None):
    """(summed loss, token count) over the evaluation windows, reduced over ranks."""
    rank = strategy.rank if strategy is not None else 0
    world = strategy.world_size if strategy is not None else 1
    device = next(model.parameters()).device
    n = count_windows(len(tokens), seq_len, max_tokens)
    if n == 0:
        raise UserError(
            f"the evaluation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}",
            "use more data or a shorter --seq-len",
        )
    mine = list(range(rank, n, world))
    batches = math.ceil(math.ceil(n / world) / batch_size)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        weight = 1.0 if chunk else 0.0
        chunk = chunk or [0]  # padding batch: same collectives, no contribution
        x, y = window_batch(tokens, [i * seq_len for i in chunk], seq_len, device)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        loss_sum += loss.double() * weight
        count += y.numel() * weight
    if was_training:
        model.train()
    totals = torch.stack([loss_sum, count])
    if strategy is not None:
        totals = strategy.all_reduce_sum(totals)
    loss_total, token_total = totals.tolist()
    return loss_total, token_total
