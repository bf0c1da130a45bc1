"""The single-process strategy's gradient clipping (DDP and FSDP share it; their multi-process
equality with one process is in tests/test_parallel.py), and the CPU allocator setting."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from gpt2cli.parallel.base import Strategy
from gpt2cli.parallel.distributed import FSDPStrategy


def output_layer_with_gradient() -> tuple[nn.Linear, torch.Tensor]:
    """A GPT-2-sized output layer whose gradient is like a real one: a few large rows (the
    batch's tokens) and 50,000 rows of small entries that together carry a third of the norm.
    torch's fp32 CPU reduction puts this norm about 8e-4 low."""
    layer = nn.Linear(128, 50257, bias=False)
    rng = torch.Generator().manual_seed(0)
    grad = torch.rand(50257, 128, generator=rng) * 2e-3
    grad[:8] = torch.randn(8, 128, generator=rng) * 0.3
    return layer, grad


def test_cpu_clipping_uses_the_exact_global_norm():
    layer, grad = output_layer_with_gradient()
    exact = float(grad.double().norm())
    layer.weight.grad = grad.clone()
    norm = Strategy("cpu").clip_grad_norm(layer, max_norm=1.0)
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(exact, rel=1e-7)
    assert float(layer.weight.grad.double().norm()) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(layer.weight.grad, grad / (exact + 1e-6))  # one factor for every entry


def test_cpu_clipping_leaves_small_gradients_alone_and_zero_only_measures():
    layer, grad = output_layer_with_gradient()
    exact = float(grad.double().norm())
    for max_norm in (0.0, 2 * exact):
        layer.weight.grad = grad.clone()
        assert float(Strategy("cpu").clip_grad_norm(layer, max_norm)) == pytest.approx(exact, rel=1e-7)
        assert torch.equal(layer.weight.grad, grad)
    layer.weight.grad = None
    assert float(Strategy("cpu").clip_grad_norm(layer, 1.0)) == 0.0  # no gradients: norm 0


HEAP_PROBE = """
import sys, torch
from gpt2cli.parallel.base import keep_freed_memory

def heap_mb():
    for line in open("/proc/self/maps"):
        if "[heap]" in line:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            return (end - start) >> 20
    return 0

keep_freed_memory(int(sys.argv[1]) << 20)
before = heap_mb()
small = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(8)]  # 8 x 4 MB
after_small = heap_mb()
large = [torch.ones(40 << 20, dtype=torch.uint8) for _ in range(2)]  # 2 x 40 MB
print(after_small - before, heap_mb() - after_small)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, Linux only")
def test_freed_blocks_below_the_threshold_come_from_the_heap_larger_ones_from_the_os():
    """keep_freed_memory(below): blocks under `below` live in glibc's heap (reused, never given
    back), larger ones in their own mappings, unmapped when freed. Run in a subprocess: the
    setting is process-wide."""
    def heap_growth(below_mb: int) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, str(below_mb)], capture_output=True, text=True,
                             check=True).stdout.split()
        return int(out[0]), int(out[1])

    small, large = heap_growth(16)  # FSDP's setting on the CPU
    assert small >= 30 and large < 10
    small, large = heap_growth(1024)  # the default: keep everything
    assert small >= 30 and large >= 80


GIVE_BACK_PROBE = """
import torch
from gpt2cli.parallel.base import give_back_freed_memory, keep_freed_memory

def heap_resident_mb():
    # Resident, not mapped: malloc_trim returns free pages inside the heap (madvise), and can
    # shrink the mapping itself only when its top is free.
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.endswith("[heap]"):
            for entry in lines[i + 1:]:
                if entry.startswith("Rss:"):
                    return int(entry.split()[1]) >> 10
    return 0

keep_freed_memory(1 << 30)
before = heap_resident_mb()
blocks = [torch.ones(40 << 20, dtype=torch.uint8) for _ in range(2)]
del blocks
kept = heap_resident_mb() - before
give_back_freed_memory()
print(kept, heap_resident_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, Linux only")
def test_giving_back_freed_memory_returns_the_kept_blocks_to_the_os():
    """train() ends what keep_freed_memory began: a caller that goes on (a notebook, a sweep) does
    not keep the freed step memory resident."""
    out = subprocess.run([sys.executable, "-c", GIVE_BACK_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    kept, after = (int(v) for v in out)
    # Freed, and still resident in the heap: the two 40 MiB blocks, less what the heap had free
    # before (a page or so; whole MiB are read, so 79 was seen once).
    assert kept >= 75
    assert after < 10  # returned to the OS


def test_train_gives_back_the_memory_it_kept_clean_or_not(monkeypatch):
    from gpt2cli import train as train_module

    calls = []
    monkeypatch.setattr(Strategy, "release_host_memory", lambda self: calls.append(self.device.type))
    monkeypatch.setattr(train_module, "_train_with", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    from gpt2cli.specs import TrainSpec

    with pytest.raises(RuntimeError, match="boom"):
        train_module._train(TrainSpec(), train_module.SilentReporter(), Strategy("cpu"), None)
    assert calls == ["cpu"]


def test_retie_gives_the_names_of_a_tied_parameter_one_tensor():
    """What FSDP's gather returns (two copies of the tied embedding) goes back to one tensor, as
    one process and DDP give it; the 2-process check is in tests/test_parallel.py."""
    from gpt2cli.model.gpt import GPT
    from gpt2cli.parallel.base import retie
    from gpt2cli.specs import ModelSpec

    model = GPT(ModelSpec(preset="tiny"))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # every name its own copy
    assert retie(model, state) is state
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert len({id(v) for v in state.values()}) == len(state) - 1  # nothing else was tied
    whole = Strategy("cpu").model_state(model)
    assert whole["lm_head.weight"] is whole["transformer.wte.weight"]
    assert retie(model, {}) == {}  # FSDP ranks other than 0 hold no full state


def test_fsdp_gives_large_freed_blocks_back_on_the_cpu():
    assert FSDPStrategy.cpu_keep_freed_below == 16 << 20 < Strategy.cpu_keep_freed_below


def _join_a_group_made_by_the_caller(rank: int, store_path: str, out_dir: str) -> None:
    """One process of test_a_process_group_made_by_the_caller_...: the caller (this function, as
    under torch.multiprocessing.spawn) makes the group and sets no RANK/WORLD_SIZE."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from gpt2cli.parallel.distributed import make_strategy

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    strategy = make_strategy("ddp", "cpu")
    strategy.setup()
    total = strategy.all_reduce_sum(torch.tensor(float(rank + 1)))
    strategy.teardown()
    result = {"rank": strategy.rank, "world_size": strategy.world_size, "is_main": strategy.is_main,
              "sum": float(total), "group_left": dist.is_initialized()}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_a_process_group_made_by_the_caller_gives_the_ranks_and_is_left_to_the_caller(tmp_path, monkeypatch):
    import json

    import torch.multiprocessing as mp

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_join_a_group_made_by_the_caller, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert results == [{"rank": rank, "world_size": 2, "is_main": rank == 0, "sum": 3.0, "group_left": True}
                       for rank in range(2)]


def test_a_strategy_destroys_only_the_process_group_it_made(monkeypatch):
    import torch.distributed as dist

    from gpt2cli.parallel.distributed import make_strategy

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    own = make_strategy("ddp", "cpu")
    own.setup()
    assert dist.is_initialized() and (own.rank, own.world_size) == (0, 1)
    own.teardown()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        theirs = make_strategy("ddp", "cpu")
        theirs.setup()
        theirs.teardown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
