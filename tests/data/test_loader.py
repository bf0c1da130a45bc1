"""TrainLoader and eval_batches: windows, shuffling, distributed shares, exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from gpt2cli.data.loader import TrainLoader, eval_batches
from gpt2cli.errors import UserError

SEQ = 8
# token value == its position, so a window is identified by its first token
TOKENS = np.arange(20 * SEQ + 5, dtype=np.uint16)  # (165 - 1) // 8 = 20 windows
NUM_WINDOWS = 20


def window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


def loader(**kwargs) -> TrainLoader:
    settings = {"batch_size": 4, "seq_len": SEQ, "seed": 1, **kwargs}
    return TrainLoader(TOKENS, **settings)


def take(data: TrainLoader, steps: int) -> list[list[int]]:
    return [window_ids(data.next_batch()[0]) for _ in range(steps)]


def test_batches_are_shifted_windows():
    x, y = loader().next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.all(x[:, 0] % SEQ == 0)  # windows start at multiples of seq_len
    assert x.is_contiguous() and y.is_contiguous()


def test_one_token_windows_train_a_bigram_model():
    """seq_len 1 is allowed: each window is one token and its successor."""
    x, y = TrainLoader(TOKENS, batch_size=4, seq_len=1, seed=1).next_batch()
    assert x.shape == y.shape == (4, 1) and torch.equal(y, x + 1)


def test_ids_outside_the_vocabulary_are_one_error_line_not_an_index_error():
    """Damaged or foreign token files: refused as the batch is read, on the host, by the train
    loader (with or without its prefetch thread) and by the evaluation batches."""
    vocab = NUM_WINDOWS * SEQ  # the last target of the last window: the one id too many
    for prefetch in (False, True):
        data = TrainLoader(TOKENS, batch_size=20, seq_len=SEQ, seed=1, prefetch=prefetch, vocab_size=vocab)
        with pytest.raises(UserError, match=rf"hold id {vocab}, outside the model's vocabulary of {vocab} ids"):
            data.next_batch()  # one batch holds every window
        data.close()
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        list(eval_batches(TOKENS, batch_size=4, seq_len=SEQ, vocab_size=vocab))
    assert TrainLoader(TOKENS, batch_size=20, seq_len=SEQ, seed=1, vocab_size=vocab + 1).next_batch()[1].max() == vocab


def test_epoch_is_a_permutation_without_replacement():
    data = loader(batch_size=5)
    epochs = [sum(take(data, 4), []) for _ in range(3)]  # 20 windows = 4 batches of 5
    for order in epochs:
        assert sorted(order) == list(range(NUM_WINDOWS))
    assert epochs[0] != list(range(NUM_WINDOWS))
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order every epoch, never periodic
    assert data.state_dict()["epoch"] == 3 and data.state_dict()["position"] == 0


def test_incomplete_last_chunk_is_dropped():
    data = loader(batch_size=3)  # 20 windows -> 6 batches, 2 windows dropped per epoch
    assert data.batches_per_epoch == 6
    first_epoch = sum(take(data, 6), [])
    assert len(set(first_epoch)) == 18
    assert data.state_dict()["epoch"] == 1
    assert first_epoch == data.epoch_order(0)[:18].tolist()


def test_same_seed_same_order_different_seed_different_order():
    assert take(loader(seed=7), 10) == take(loader(seed=7), 10)
    assert take(loader(seed=7), 10) != take(loader(seed=8), 10)


def test_two_ranks_are_disjoint_and_match_one_rank_with_double_batch():
    single = loader(batch_size=4)
    ranks = [loader(batch_size=2, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(12):  # 2.4 epochs
        together = window_ids(single.next_batch()[0])
        parts = [window_ids(r.next_batch()[0]) for r in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == together
        seen.append(together)
    covered = sum(seen[:5], [])  # the first epoch: 5 steps of 4 windows
    assert sorted(covered) == list(range(NUM_WINDOWS))


@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_across_an_epoch_boundary(prefetch):
    reference = loader(batch_size=3, prefetch=prefetch)
    take(reference, 4)
    state = reference.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = take(reference, 6)  # crosses from epoch 0 (6 batches) into epoch 1

    # the state survives a weights_only checkpoint round trip
    buffer = io.BytesIO()
    torch.save({"loader": state}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["loader"]

    resumed = loader(batch_size=3, prefetch=prefetch)
    take(resumed, 1)  # its own position (and any prefetched batch) is discarded
    resumed.load_state_dict(restored)
    assert take(resumed, 6) == expected
    resumed.close()
    reference.close()


def test_resume_with_another_world_size_continues_the_global_order():
    one = loader(batch_size=4)
    take(one, 2)
    state = one.state_dict()
    expected = take(one, 3)
    ranks = [loader(batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got = [sum((window_ids(r.next_batch()[0]) for r in ranks), []) for _ in range(3)]
    assert got == expected


def test_changed_layout_is_refused():
    state = loader().state_dict()
    with pytest.raises(UserError, match="seq_len"):
        TrainLoader(TOKENS, batch_size=4, seq_len=4, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        loader(seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="training split changed"):
        TrainLoader(TOKENS[:100], batch_size=4, seq_len=SEQ, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="lacks"):
        loader().load_state_dict({"epoch": 0})


def test_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one window"):
        TrainLoader(TOKENS[:SEQ], batch_size=1, seq_len=SEQ, seed=0)
    with pytest.raises(UserError, match="fewer than one global batch"):
        TrainLoader(TOKENS, batch_size=16, seq_len=SEQ, seed=0, world_size=2)
    with pytest.raises(UserError, match="outside a world"):
        TrainLoader(TOKENS, batch_size=1, seq_len=SEQ, seed=0, rank=2, world_size=2)


def test_iterator_protocol_and_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    data = TrainLoader(np.memmap(path, dtype=np.uint16, mode="r"), batch_size=2, seq_len=SEQ, seed=3)
    x, y = next(iter(data))
    assert torch.equal(y, x + 1)


# ---------------------------------------------------------------------------------- eval

def test_eval_batches_are_deterministic_and_in_order():
    batches = list(eval_batches(TOKENS, batch_size=3, seq_len=SEQ))
    assert [window_ids(x) for x, _, _ in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14],
                                                     [15, 16, 17], [18, 19]]
    assert all(w == 1.0 for _, _, w in batches)
    again = list(eval_batches(TOKENS, batch_size=3, seq_len=SEQ))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert all(torch.equal(y, x + 1) for x, y, _ in batches)


@pytest.mark.parametrize("world_size,batch_size", [(2, 3), (3, 3), (3, 4), (4, 1), (7, 2)])
def test_eval_ranks_count_every_window_once(world_size, batch_size):
    """Rank r scores windows r, r + world, ...; every rank runs the same number of batches (FSDP),
    ending with padding batches of weight 0 where it has fewer windows. Counted windows: all 20,
    once each, whatever the world size."""
    shares = [list(eval_batches(TOKENS, batch_size=batch_size, seq_len=SEQ, rank=r, world_size=world_size))
              for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    counted = sorted(w for share in shares for x, _, weight in share if weight for w in window_ids(x))
    assert counted == list(range(NUM_WINDOWS))
    assert all(window_ids(x) == [0] for share in shares for x, _, weight in share if not weight)
    assert [window_ids(x) for x, _, _ in shares[1]][0] == list(range(1, NUM_WINDOWS, world_size))[:batch_size]


def test_eval_max_tokens():
    limited = [window_ids(x) for x, _, _ in eval_batches(TOKENS, batch_size=4, seq_len=SEQ, max_tokens=5 * SEQ)]
    assert limited == [[0, 1, 2, 3], [4]]
    # fewer windows than processes: the extra ranks only pad
    shares = [list(eval_batches(TOKENS, batch_size=2, seq_len=SEQ, max_tokens=3 * SEQ, rank=r, world_size=4))
              for r in range(4)]
    assert [[(window_ids(x), w) for x, _, w in share] for share in shares] == [
        [([0], 1.0)], [([1], 1.0)], [([2], 1.0)], [([0], 0.0)]]


def test_eval_too_short():
    with pytest.raises(UserError, match="fewer than one window"):
        list(eval_batches(TOKENS[:4], batch_size=2, seq_len=SEQ))
    with pytest.raises(UserError, match="outside a world"):
        list(eval_batches(TOKENS, batch_size=2, seq_len=SEQ, rank=2, world_size=2))
