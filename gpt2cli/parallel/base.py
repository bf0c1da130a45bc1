"""The Strategy interface: everything the training loop asks of "how many processes, which
device, how is the model spread".

The loop never calls torch.distributed itself. It asks a Strategy to wrap the finished model, to
silence gradient sync during accumulation, to reduce metrics, to clip by the global norm and to
produce or load the *full* (unsharded) state that checkpoints hold, so a checkpoint written under
one strategy loads under any other.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn

from gpt2cli.errors import UserError
from gpt2cli.specs import DEVICE_HELP, DEVICE_RE

# torch.distributed.checkpoint.state_dict is imported where a state is taken or loaded, not here:
# it pulls in DTensor (0.8 s), which generate, eval and export would pay through resolve_device.


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """auto -> cuda (this process's GPU) if present, else mps, else cpu. Unavailable or unknown
    (anything but auto, cpu, cuda, cuda:N, mps) -> UserError."""
    name = str(name)
    if not DEVICE_RE.match(name):  # the check of every spec's device field, for direct callers
        raise UserError(f"unknown device {name!r}", "use " + DEVICE_HELP.rstrip("."))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU", "use --device cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist",
                "pick an existing index",
            )
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("device 'mps' asked for, but MPS is not available here", "use --device cpu or auto")
    return torch.device(name)


class Strategy:
    """One process, one device. Subclasses add process groups and model wrapping."""

    name = "single"
    # On the CPU, freed blocks smaller than this stay in glibc's heap for the next step
    # (keep_freed_memory): fast for every strategy whose blocks come back in the same sizes.
    cpu_keep_freed_below = 1 << 30

    def __init__(self, device: str = "auto", activation_checkpointing: bool = False) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.asked_device = str(device)  # as given (auto, cuda, ...): resolved again if the rank changes
        self.device = resolve_device(device, self.local_rank)
        self.activation_checkpointing = activation_checkpointing

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            keep_freed_memory(self.cpu_keep_freed_below)

    def teardown(self) -> None:
        pass

    def release_host_memory(self) -> None:
        """What setup() did to the process's allocator, undone; called after every run, clean or not."""
        if self.device.type != "cuda":
            give_back_freed_memory()

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply activation checkpointing (if asked) to a finished model; return what trains."""
        if self.activation_checkpointing:
            apply_activation_checkpointing(model)
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-steps that must not all-reduce gradients."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (0 = only measure) and return the global pre-clip norm, the same
        value on every rank (a 0-d fp32 tensor).

        On an accelerator: torch's foreach norm, no host sync. On the CPU the squares are summed in
        fp64: torch's fp32 CPU reduction drops the many tiny entries of a large gradient (most of
        the output layer's 50,257 rows carry only softmax mass), which put nano's norm 0.06% low
        and made it depend on how the gradient is split (one process, DDP, FSDP shards)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.device.type != "cpu":
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
            # The norm of sharded (FSDP) gradients is a DTensor; every rank needs the value.
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        squares = torch.zeros((), dtype=torch.float64)
        for g in grads:
            squares += torch.linalg.vector_norm(g, dtype=torch.float64).square()
        total = self.sum_over_shards(squares).sqrt()
        if max_norm > 0:
            coef = max_norm / (float(total) + 1e-6)  # torch's clip_grad_norm_ rule
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        return total.float()

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial result over the shards of the parameters (FSDP); parameters that
        every rank holds whole (one process, DDP) need nothing."""
        return value

    # ------------------------------------------------------------------ reductions
    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    # ------------------------------------------------------------------ state
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict on CPU, keys without wrapper prefixes (collective under FSDP).
        Names of one tied parameter (lm_head.weight is transformer.wte.weight) hold one tensor,
        so a checkpoint stores it once under every strategy (see :func:`retie`)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return retie(model, get_model_state_dict(model, options=_full_state_options(cpu_offload=True)))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The full optimizer state keyed by parameter names (collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options(cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_state_options(strict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_state_options())


def _full_state_options(**options: bool):
    """StateDictOptions for the full (unsharded) state, with ``options`` on top."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


# Prefixes that wrappers add to parameter names and get_model_state_dict leaves out: DDP's
# module, torch.compile's _orig_mod, the activation checkpoint wrapper's module.
_WRAPPER_PARTS = ("module", "_orig_mod", "_checkpoint_wrapped_module")


def retie(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Point every name of a shared parameter at one tensor in ``state`` (in place; returned).

    One process and DDP copy the tied embedding to the CPU once, and torch.save writes shared
    storage once. FSDP gathers each name separately: lm_head.weight and transformer.wte.weight
    came back as two copies of the same values, and FSDP checkpoints were twice the size of the
    others at tiny presets (the 50,257-row embedding is most of the model). Ranks that hold no
    state (FSDP's full state lives on rank 0) have nothing to tie."""
    if not state:
        return state
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
        owner = first.setdefault(id(param), key)
        if owner != key and owner in state and key in state:
            state[key] = state[owner]
    return state


def _glibc():
    """glibc's C library, or None elsewhere (macOS, musl, Windows): callers then keep the defaults."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's documented starting values of both thresholds (mallopt(3)).
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def keep_freed_memory(below: int = 1 << 30) -> None:
    """Let glibc keep freed blocks smaller than ``below`` bytes instead of returning them to the OS.

    A CPU training step allocates and frees the same large tensors (logits over the 50257-token
    vocabulary: hundreds of MB) every step. glibc serves such blocks with mmap and unmaps them on
    free, so each step page-faults them in again: on the 2-core test machine that was about 1 s of
    system time per step for nano at batch 16 x 128. Raising the mmap and trim thresholds makes the
    heap reuse them (measured: 4x less system time, 1.5-2x faster steps). The price is that the
    heap does not shrink while the setting holds: where block sizes vary from step to step, as
    FSDP's per-layer gathers do, it fragments and grows (see FSDPStrategy). The setting is
    process-wide: give_back_freed_memory() ends it. No-op elsewhere than Linux with glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, below)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


def give_back_freed_memory() -> None:
    """Undo keep_freed_memory: glibc's starting thresholds again, and the heap's free memory
    returned to the OS now, so a caller that goes on after train() (a notebook, a sweep) does not
    keep the run's largest step resident. (glibc then no longer raises the mmap threshold by itself
    as it does from a fresh start; that only changes which of two allocators serves a block.)"""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
