"""DDP and FSDP2 strategies: several processes, one model replica (DDP) or shard (FSDP) each.

Both are applied to a finished model from outside. Under either, every rank computes the same
global gradient norm and the same averaged metrics; only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from gpt2cli.errors import UserError
from gpt2cli.parallel.base import Strategy, resolve_device
from gpt2cli.torchrun import tcp_store


class _ProcessGroupStrategy(Strategy):
    def __init__(self, device: str = "auto", activation_checkpointing: bool = False,
                 dist_timeout: float = 300.0) -> None:
        super().__init__(device, activation_checkpointing)
        self.dist_timeout = dist_timeout
        self.owns_group = False  # whether setup made the process group (and teardown destroys it)

    def setup(self) -> None:
        self.owns_group = False
        if dist.is_initialized():
            # A group the caller made (e.g. under torch.multiprocessing.spawn): this process's place
            # in it is the group's, not the environment's, which such callers need not set.
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            self.device = resolve_device(self.asked_device, self.local_rank)
            super().setup()
            return
        super().setup()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=self.dist_timeout)
        kwargs = {"backend": backend, "timeout": timeout, **_attempt_store(timeout)}
        if backend == "nccl":
            kwargs["device_id"] = self.device
        dist.init_process_group(**kwargs)
        self.owns_group = True
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def teardown(self) -> None:
        """Destroy the process group if setup made it; one the caller made stays theirs."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def barrier(self) -> None:
        dist.barrier()


def _attempt_store(timeout: datetime.timedelta) -> dict:
    """After an elastic restart, the workers of the new attempt must not read the addresses that
    the dead attempt's workers left in torchrun's store (gloo then connects to a closed port).
    Keying the process group by the attempt number keeps every attempt's rendezvous apart."""
    if "RANK" not in os.environ:
        # One process, not started by torchrun (e.g. --strategy ddp without --nproc): a private
        # in-memory store makes a group of one.
        return {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # Where torch's agent shares no store, rank 0 serves one: on loopback only for a one-node run.
    store = tcp_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                      is_master=not agent_store and rank == 0, timeout=timeout)
    return {"store": dist.PrefixStore(f"gpt2cli/attempt-{attempt}", store), "rank": rank, "world_size": world}


class DDPStrategy(_ProcessGroupStrategy):
    """Replicated model; gradients all-reduced once per optimizer step (not per micro-step)."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = super().wrap(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync()


class FSDPStrategy(_ProcessGroupStrategy):
    """FSDP2: each block sharded with fully_shard, then the root; bf16 params with fp32 gradient
    reduction on GPU."""

    name = "fsdp"
    # FSDP exists to save memory. On the CPU, keeping every freed block (the base setting) let
    # the heap fragment around the per-layer gathers (28 MB each at GPT-2 124M, the 154 MB
    # embedding, reduce-scatter buffers) until rank 0 held more than DDP's: 4.3 GB against
    # 3.6 GB. Blocks of 16 MB and more go back to the OS instead: 2.3 GB at 2 processes; with
    # huge pages for them (launch.worker_env) no slower at gpt2, 5% slower at nano
    # (docs/benchmarks.md, "Data-parallel scaling").
    cpu_keep_freed_below = 16 << 20

    def __init__(self, device: str = "auto", activation_checkpointing: bool = False,
                 dist_timeout: float = 300.0, reshard_after_forward: bool = True,
                 cpu_offload: bool = False, mixed_precision: bool | None = None) -> None:
        super().__init__(device, activation_checkpointing, dist_timeout)
        if cpu_offload:
            check_cpu_offload(self.device, device)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        # bf16 parameters are a GPU speed feature; on CPU they only cost accuracy.
        self.mixed_precision = self.device.type == "cuda" if mixed_precision is None else mixed_precision

    def wrap(self, model: nn.Module) -> nn.Module:
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch 2.4/2.5 kept FSDP2 under _composable
            from torch.distributed._composable.fsdp import (
                CPUOffloadPolicy,
                MixedPrecisionPolicy,
                fully_shard,
            )

        model = super().wrap(model)
        kwargs: dict = {"reshard_after_forward": self.reshard_after_forward}
        if self.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return _fsdp_no_sync(model)

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(value)


def check_cpu_offload(device: torch.device, asked: str = "auto") -> None:
    """FSDP's CPU offload moves sharded parameters off a CUDA GPU; fully_shard raises a torch
    error in every rank on any other device. The spec refuses --device cpu and mps; this is the
    check of what ``asked`` (--device auto) resolved to, made by the launcher before it creates
    the run folder and again by each worker."""
    if device.type != "cuda":
        raise UserError(
            f"--fsdp-cpu-offload needs a CUDA device, and --device {asked} is {device.type} on this machine",
            "drop --fsdp-cpu-offload, or train on a machine with CUDA GPUs",
        )


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2 equivalent of DDP.no_sync: skip reduce-scatter during accumulation micro-steps."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def make_strategy(strategy: str, device: str, *, activation_checkpointing: bool = False,
                  dist_timeout: float = 300.0, fsdp_reshard_after_forward: bool = True,
                  fsdp_cpu_offload: bool = False) -> Strategy:
    if strategy == "single":
        return Strategy(device, activation_checkpointing)
    if strategy == "ddp":
        return DDPStrategy(device, activation_checkpointing, dist_timeout)
    if strategy == "fsdp":
        return FSDPStrategy(device, activation_checkpointing, dist_timeout,
                            reshard_after_forward=fsdp_reshard_after_forward, cpu_offload=fsdp_cpu_offload)
    raise UserError(f"unknown strategy {strategy!r}", "use single, ddp or fsdp")
