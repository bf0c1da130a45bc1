"""Batches for training and evaluation, read from memory-mapped token files.

Training (:class:`TrainLoader`)
    The split is cut into windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len``
    (inputs are the first ``seq_len`` tokens, targets the last ``seq_len``). Every epoch visits
    the windows in a fresh permutation drawn from a ``torch.Generator`` seeded by (seed, epoch):
    no window repeats within an epoch and the order never cycles. The permutation is one global
    order for all processes: each micro-step consumes the next ``batch_size * world_size``
    windows and rank r takes the r-th slice of ``batch_size`` of them, so the ranks read disjoint
    windows, and 2 ranks x batch B/2 read exactly the windows of 1 rank x batch B. An incomplete
    last chunk of an epoch is dropped.

    ``state_dict()`` holds plain ints (epoch and position in the global order), so a resumed run
    continues with the very next window, across epoch boundaries too, and even with a different
    world size or batch size (the global order does not depend on them).

Evaluation (:func:`eval_batches`)
    Non-overlapping windows in file order, from the start of the split: the same tokens for every
    checkpoint, every run and every number of processes, so validation numbers are comparable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from gpt2cli.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]

_STATE_KEYS = ("epoch", "position", "seed", "world_size", "batch_size", "seq_len", "num_windows")


def _check_layout(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside a world of {world_size} processes")


def count_windows(num_tokens: int, seq_len: int, max_tokens: int | None = None) -> int:
    """Windows of ``seq_len + 1`` tokens that start at multiples of ``seq_len`` (the inputs do not
    overlap), capped at ``max_tokens // seq_len`` windows (at least one) when given."""
    n = max(0, (num_tokens - 1) // seq_len)
    return n if max_tokens is None else min(n, max(1, max_tokens // seq_len))


def _too_short_error(num_tokens: int, seq_len: int) -> UserError:
    return UserError(
        f"the split has {num_tokens:,} tokens, fewer than one window of seq_len + 1 = {seq_len + 1:,}",
        "use a shorter seq_len or prepare more data",
    )


def out_of_vocabulary(token_id: int, size: int, whose: str) -> UserError:
    """Token files holding an id the vocabulary (``whose``, of ``size`` ids) does not have."""
    return UserError(
        f"the token files hold id {token_id:,}, outside {whose} vocabulary of {size:,} ids",
        "they are damaged or were made with another tokenizer: prepare the data again with gpt2 data",
    )


def _gather_windows(tokens: np.ndarray, window_indices: np.ndarray, seq_len: int, pin: bool,
                    vocab_size: int | None = None) -> Batch:
    """Inputs and targets (int64, contiguous, pinned when bound for CUDA) of the given windows.
    With ``vocab_size``, an id at or above it is a UserError here, on the host: in the model it is
    an IndexError traceback on a CPU and a device-side assert on a GPU."""
    starts = window_indices.astype(np.int64) * seq_len
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)])
    if vocab_size is not None and windows.size and int(windows.max()) >= vocab_size:
        raise out_of_vocabulary(int(windows.max()), vocab_size, "the model's")
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))
    y = torch.from_numpy(windows[:, 1:].astype(np.int64))
    if pin:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    x, y = batch
    # non_blocking with pinned memory: the copy overlaps with the compute already queued
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch); neighbouring seeds give unrelated orders."""
    digest = hashlib.sha256(f"gpt2cli-train-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrainLoader:
    """Shuffled, sharded, resumable training batches (see the module docstring).

    ``prefetch`` (default: on for CUDA) prepares the next batch on a background thread while
    the model computes; the state always describes the batches handed out, never prefetched ones.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        prefetch: bool | None = None,
        vocab_size: int | None = None,
    ) -> None:
        _check_layout(batch_size, seq_len, rank, world_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.vocab_size = vocab_size  # ids at or above it are refused as batches are read
        self.num_windows = count_windows(len(tokens), seq_len)
        if self.num_windows < 1:
            raise _too_short_error(len(tokens), seq_len)
        if self.num_windows < self.global_batch:
            raise UserError(
                f"the split has {self.num_windows:,} windows of {seq_len + 1:,} tokens, fewer than one "
                f"global batch of {self.global_batch:,} (batch_size {batch_size} x {world_size} processes)",
                "use a smaller batch size or seq_len, or prepare more data",
            )
        self.epoch = 0
        self.position = 0  # index into the epoch's order of the next window to hand out
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._orders: dict[int, np.ndarray] = {}
        use_prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpt2-prefetch") if use_prefetch else None
        self._prefetched: tuple[int, int, Future] | None = None

    # ----------------------------------------------------------------------------- order

    @property
    def global_batch(self) -> int:
        """Windows consumed per micro-step across all ranks."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all window indices that ``epoch`` visits (the same on every rank)."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(self.num_windows, generator=generator).numpy()
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # at most 2 kept
            self._orders[epoch] = order
        return self._orders[epoch]

    def _normalized(self, epoch: int, position: int) -> tuple[int, int]:
        """Where the next full global chunk starts (the incomplete tail of an epoch is dropped)."""
        if position + self.global_batch > self.num_windows:
            return epoch + 1, 0
        return epoch, position

    def _rank_windows(self, epoch: int, position: int) -> np.ndarray:
        start = position + self.rank * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]

    def _read(self, epoch: int, position: int) -> Batch:
        return _gather_windows(self.tokens, self._rank_windows(epoch, position), self.seq_len, self._pin,
                               self.vocab_size)

    # ----------------------------------------------------------------------------- batches

    def next_batch(self) -> Batch:
        """The next (inputs, targets) pair: int64 tensors of shape [batch_size, seq_len] on ``device``."""
        epoch, position = self._normalized(self.epoch, self.position)
        batch = self._take_prefetched(epoch, position) or self._read(epoch, position)
        self.epoch, self.position = self._normalized(epoch, position + self.global_batch)
        if self._executor is not None:
            self._prefetched = (self.epoch, self.position, self._executor.submit(self._read, self.epoch, self.position))
        return _to_device(batch, self.device)

    def _take_prefetched(self, epoch: int, position: int) -> Batch | None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return None
        p_epoch, p_position, future = prefetched
        if (p_epoch, p_position) != (epoch, position):
            future.cancel()
            return None
        return future.result()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, int]:
        """Plain ints: where the next batch comes from, and the layout that order belongs to."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off.

        A different batch size or world size is fine (the global order continues from the same
        window); a different seed, seq_len or split would skip or repeat data and is refused.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise UserError(f"the data loader state lacks {', '.join(missing)}", "the checkpoint is damaged")
        saved = {key: int(state[key]) for key in _STATE_KEYS}
        hint = "resume with the settings and data of the saved run, or start a new run"
        if saved["seq_len"] != self.seq_len:
            raise UserError(
                f"the checkpoint's data windows have seq_len {saved['seq_len']}, this run uses {self.seq_len}", hint
            )
        if saved["num_windows"] != self.num_windows:
            raise UserError(
                f"the training split changed: the checkpoint saw {saved['num_windows']:,} windows, "
                f"this data has {self.num_windows:,}",
                hint,
            )
        if saved["seed"] != self.seed:
            raise UserError(f"the checkpoint's data order has seed {saved['seed']}, this run uses {self.seed}", hint)
        if saved["epoch"] < 0 or not 0 <= saved["position"] <= self.num_windows:
            raise UserError(
                f"the data loader state is out of range (epoch {saved['epoch']}, position {saved['position']})",
                "the checkpoint is damaged",
            )
        self.epoch, self.position = self._normalized(saved["epoch"], saved["position"])
        if self._prefetched is not None:
            self._prefetched[2].cancel()
            self._prefetched = None

    def close(self) -> None:
        """Stop the prefetch thread (also safe to skip: it exits with the interpreter)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._prefetched = None


# ===================================================================================== eval

def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """This rank's evaluation batches ``(x, y, weight)``.

    The windows are the split's first :func:`count_windows` windows in file order. Rank r takes
    windows r, r + world_size, r + 2 * world_size, ...; every rank yields the same number of
    batches, because FSDP gathers weights collectively. A rank that runs out of windows first
    yields padding batches (window 0) with weight 0, which must not be counted. Every window is
    therefore counted exactly once, whatever the world size and batch size.
    """
    _check_layout(batch_size, seq_len, rank, world_size)
    n = count_windows(len(tokens), seq_len, max_tokens)
    if n == 0:
        raise _too_short_error(len(tokens), seq_len)
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()  # pinned host memory: non-blocking copies
    mine = np.arange(rank, n, world_size, dtype=np.int64)
    batches = math.ceil(math.ceil(n / world_size) / batch_size)
    padding = np.zeros(1, dtype=np.int64)
    for b in range(batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        x, y = _to_device(_gather_windows(tokens, chunk if len(chunk) else padding, seq_len, pin, vocab_size), device)
        yield x, y, 1.0 if len(chunk) else 0.0
