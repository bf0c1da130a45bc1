"""The training workflow: build, (resume,) loop, evaluate, checkpoint.

``train(spec)`` is the whole of `gpt2 train` minus the printing: it reports progress through a
:class:`Reporter` (the CLI renders it with rich) and returns a :class:`TrainResult`. The loop asks
a :class:`~gpt2cli.parallel.Strategy` for everything that depends on the number of processes, so
single-device, DDP and FSDP share this code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gpt2cli import checkpoint as ckpt
from gpt2cli.errors import NonFiniteLossError, UserError
from gpt2cli.evaluate import evaluate_loss
from gpt2cli.fsutil import FolderLock
from gpt2cli.metrics import (
    STATUS_NAME,
    TENSORBOARD_DIR,
    MetricsWriter,
    TensorBoardWriter,
    WandbWriter,
    mfu,
    package_missing,
    peak_flops,
    perplexity,
    truncate_metrics,
)
from gpt2cli.model import GPT
from gpt2cli.optim import build_optimizer, check_optimizer, keep_settings_of
from gpt2cli.parallel import Strategy, make_strategy
from gpt2cli.profiling import StepProfiler
from gpt2cli.specs import (
    DEFAULT_DECAY_FRACTION,
    DEFAULT_LOSS_CHUNK,
    DEFAULT_STEPS,
    ParallelSpec,
    TrainSpec,
    flatten,
    spec_from_json,
    spec_to_json,
    validate_spec,
)

# --------------------------------------------------------------------------------- reporting


class Reporter(Protocol):
    """What the loop tells the outside world (rank 0 only)."""

    def start(self, info: dict[str, Any]) -> None: ...
    def advance(self, step: int) -> None: ...  # every step: host counters only, no device sync
    def step(self, row: dict[str, Any]) -> None: ...  # every log_every steps, with the measured row
    def evaluation(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: TrainResult) -> None: ...


class SilentReporter:
    def start(self, info: dict[str, Any]) -> None: ...
    def advance(self, step: int) -> None: ...
    def step(self, row: dict[str, Any]) -> None: ...
    def evaluation(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "early-stopped" (--patience) | "interrupted"
    step: int
    total_steps: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    wall_s: float
    checkpoint: Path | None
    best: Path | None
    # SIGINT/SIGTERM that came during the last step, its evaluation or checkpoint, too late to stop
    # a run that then completed: the caller (a sweep) still owes the user a stop.
    late_signal: int | None = None

    @property
    def finished(self) -> bool:
        """The run is over (its steps done, or stopped early by --patience): nothing to resume."""
        return self.status in ("completed", "early-stopped")


# ----------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    batch_size: int
    seq_len: int
    grad_accum: int
    total_steps: int

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, all processes together."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def plan_batches(spec: TrainSpec, world_size: int) -> BatchPlan:
    """Global batch = per-process batch x grad-accum x world size; --batch-tokens fixes the global
    batch in tokens whatever the world size; --tokens sets the number of steps."""
    t = spec.train
    seq_len = spec.seq_len
    micro_tokens = t.batch_size * seq_len * world_size
    grad_accum = t.grad_accum
    if t.batch_tokens is not None:
        if t.batch_tokens % micro_tokens:
            raise UserError(
                f"--batch-tokens {t.batch_tokens} is not a multiple of batch_size x seq_len x world size "
                f"= {t.batch_size} x {seq_len} x {world_size} = {micro_tokens}",
                "pick a multiple so the global batch is exact",
            )
        grad_accum = t.batch_tokens // micro_tokens
    tokens_per_step = micro_tokens * grad_accum
    if t.steps is not None:
        total = t.steps
    elif t.tokens is not None:
        total = max(1, math.ceil(t.tokens / tokens_per_step))
    else:
        total = DEFAULT_STEPS
    return BatchPlan(world_size, t.batch_size, seq_len, grad_accum, total)


def warmup_steps(spec: TrainSpec, total_steps: int) -> int:
    """The given warm-up, or 5% of the run."""
    return spec.optim.warmup if spec.optim.warmup is not None else max(1, round(0.05 * total_steps))


def decay_steps(spec: TrainSpec, total_steps: int) -> int:
    """wsd: the steps of its decay, the last of them at min_lr."""
    fraction = spec.optim.decay_fraction if spec.optim.decay_fraction is not None else DEFAULT_DECAY_FRACTION
    return max(1, round(fraction * total_steps))


def decay_start_step(spec: TrainSpec, total_steps: int) -> int:
    """The step index where the decay from lr to min_lr begins: right after warm-up, except for
    wsd, which holds lr until its last decay_fraction of the steps. For wsd a longer budget moves
    it later and leaves every earlier step's lr as it was."""
    warmup = warmup_steps(spec, total_steps)
    if spec.optim.schedule != "wsd":
        return warmup
    return max(warmup, total_steps - decay_steps(spec, total_steps))


def lr_at(step: int, spec: TrainSpec, total_steps: int) -> float:
    """Linear warm-up over `warmup` steps, then the chosen decay from lr to min_lr, reached one
    step past the last."""
    o = spec.optim
    assert o.min_lr is not None
    warmup = warmup_steps(spec, total_steps)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    decay_start = decay_start_step(spec, total_steps)
    if o.schedule == "constant" or step < decay_start:
        return o.lr
    if o.schedule == "wsd":
        # The cool-down is the point of wsd: its last step runs at min_lr, also when it is short.
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    else:
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if o.schedule in ("linear", "wsd"):
        return o.lr - progress * (o.lr - o.min_lr)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def describe_schedule(spec: TrainSpec, total_steps: int) -> str:
    """The learning rate over the run in words, for --dry-run; steps counted from 1, as in
    metrics.jsonl (step N runs with lr_at(N - 1))."""
    o = spec.optim
    warmup = warmup_steps(spec, total_steps)
    if warmup > total_steps:
        peak = lr_at(total_steps - 1, spec, total_steps)
        return (f"warm-up {warmup:,} steps, longer than the run's {total_steps:,}: the lr rises to {peak:.3g} at "
                f"step {total_steps:,}, not to --lr {o.lr:g}")
    text = f"warm-up {warmup:,} steps to {o.lr:g}" if warmup else f"{o.lr:g} from the first step"
    if o.schedule == "constant":
        return text + ", then constant"
    decay_start = decay_start_step(spec, total_steps)
    if o.schedule == "wsd":
        held = f", held through step {decay_start:,}" if decay_start > warmup else ""
        return text + held + f", linear decay to {o.min_lr:g} at step {total_steps:,}"
    shape = "cosine" if o.schedule == "cosine" else "linear"
    return text + f", {shape} decay towards {o.min_lr:g}, reached after step {total_steps:,}"


# ------------------------------------------------------------------------------ fault hooks


def _faults() -> list[list[str]]:
    return [f.split(":") for f in os.environ.get(ckpt.FAULT_ENV, "").split(",") if f]


def _fault_at(kind: str, step: int, rank: int) -> bool:
    """GPT2_FAULT=kind:STEP[:rankR] (reliability tests; off unless the variable is set).
    crash faults fire only in the first attempt of an elastic job, so a restart can recover."""
    for parts in _faults():
        if parts[0] != kind or len(parts) < 2 or int(parts[1]) != step:
            continue
        if len(parts) > 2 and parts[2] != f"rank{rank}":
            continue
        if kind == "crash_at_step" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            continue
        return True
    return False


# ------------------------------------------------------------------------------ precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on a CUDA GPU that has it, else fp32; fp32, bf16, fp16 as named; else UserError."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}", f"use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_loss_chunk(loss_chunk: int | None, compiled: bool, device: torch.device) -> int:
    """train.loss_chunk's default: chunked only for eager steps off CUDA.

    Compiled, the compiler fuses the loss by itself. On the CPU the chunked loss is both leaner and
    12-25% faster; on an H200 eager step (GPT-2 124M, B=16, T=1024, bf16) it halved the memory
    (16.0 to 7.4 GB) but cost 21% of the speed (72.7 to 88.2 ms), so CUDA keeps the plain loss
    and the memory is the user's trade to make (docs/benchmarks.md)."""
    if loss_chunk is not None:
        return loss_chunk
    return 0 if compiled or device.type == "cuda" else DEFAULT_LOSS_CHUNK


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------ run folder


def check_requirements(spec: TrainSpec) -> None:
    """What the settings need of the installed packages (--optimizer muon: a torch with Muon;
    --tensorboard, --wandb: their packages), checked before anything is written."""
    check_optimizer(spec)
    check_tensorboard(spec)
    check_wandb(spec)


def _require_package(flag: str, package: str, module: str) -> Any:
    """``module`` imported, or one line for ``flag``: its package is not installed, or does not load
    (installed but broken, e.g. against a protobuf it does not work with): said now, not mid-run."""
    if package_missing(package):
        raise UserError(f"{flag} needs the {package} package, which is not installed",
                        f"pip install 'gpt2cli[{package}]' (or {package}), or drop {flag}")
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise UserError(f"{flag}: the {package} package does not load ({str(exc).splitlines()[0][:200]})",
                        f"repair the installation (pip install -U {package}), or drop {flag}") from exc


def check_wandb(spec: TrainSpec) -> None:
    """--wandb without the package, or online without credentials: one line, before the run folder.
    (The network itself is first met by wandb.init, in the run.)"""
    if not spec.run.wandb:
        return
    wandb = _require_package("--wandb", "wandb", "wandb")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    try:  # reads WANDB_API_KEY, the settings files or ~/.netrc; no network, no prompt
        logged_in = wandb.login(verify=False, prompt=False)
    except TypeError:  # a wandb without prompt=: leave the check to wandb.init
        return
    if not logged_in:
        raise UserError("--wandb: no W&B credentials (no WANDB_API_KEY, no wandb login)",
                        "run wandb login, or set WANDB_MODE=offline to log locally and wandb sync later")


def check_tensorboard(spec: TrainSpec) -> None:
    """--tensorboard without the package: one line before anything is written."""
    if spec.run.tensorboard:
        _require_package("--tensorboard", "tensorboard", "torch.utils.tensorboard")


def _start_wandb(run_dir: Path, spec: TrainSpec) -> WandbWriter:
    """The W&B mirror; a W&B run that does not start (network, permissions) is one line."""
    try:
        return WandbWriter(run_dir, project=spec.run.wandb_project, name=spec.run.wandb_name or run_dir.name,
                           config=json.loads(spec_to_json(spec)), quiet=spec.run.quiet)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--wandb: W&B did not start a run ({reason})",
                        "check wandb login and the network, or set WANDB_MODE=offline; the run folder is kept: "
                        "--resume auto continues it") from exc


def _same_on_every_rank(strategy: Strategy, device: torch.device, value: float) -> bool:
    """Whether every process holds the same ``value`` (collective: every rank must ask)."""
    both = strategy.all_reduce_max(torch.tensor([value, -value], dtype=torch.float64, device=device))
    return float(both[0]) == -float(both[1])


def auto_run_name(spec: TrainSpec) -> str:
    m = spec.model
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{m.preset or 'custom'}-{m.attn}-{m.pos}-{stamp}"


def claim_new_folder(path: Path) -> Path:
    """Create ``path``, or ``path-2``, ``path-3``, ... if it exists: an auto-named run folder of its
    own even for two runs started in the same second (mkdir is atomic: one of them gets each name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"no free run folder name next to {str(path)!r}", "pass --out RUN_DIR")


def resolve_run_dir(spec: TrainSpec, world_size: int) -> Path:
    if spec.run.out:
        return Path(spec.run.out)
    if spec.run.resume not in (None, "auto"):
        target = Path(spec.run.resume)
        return target if target.is_dir() else target.parent
    if spec.run.resume == "auto":
        raise UserError("--resume auto needs the run folder", "pass --out RUN_DIR")
    if world_size > 1:
        raise UserError("a multi-process run needs --out", "the launcher sets it; under torchrun pass --out RUN_DIR")
    return Path(spec.run.runs_dir) / auto_run_name(spec)


def take_run_folder(lock: FolderLock) -> None:
    """Hold ``lock`` (on a run folder), or refuse: another gpt2 train is writing that folder."""
    if not lock.acquire():
        raise UserError(f"run folder {str(lock.folder)!r} is in use by another gpt2 train",
                        "wait for it to finish or stop it, or choose another --out")


def refuse_existing_run(spec: TrainSpec, run_dir: Path) -> None:
    """A new run never writes into a folder that holds another run's metrics or checkpoints."""
    if spec.run.resume is None and any((run_dir / n).exists() for n in ("metrics.jsonl", ckpt.CKPT_NAME)):
        raise UserError(f"run folder {str(run_dir)!r} already holds a run",
                        "continue it with --resume auto, or choose another --out")


def find_resume_checkpoint(spec: TrainSpec, run_dir: Path, warn: Any) -> Path | None:
    """--resume auto: the latest complete checkpoint, if any; a folder: its latest; a file: it."""
    target = spec.run.resume
    if target is None:
        return None
    if target == "auto":
        return _latest_in(run_dir, warn, "--resume auto") if run_dir.exists() else None
    p = Path(target)
    if p.is_dir():
        found = _latest_in(p, warn, f"--resume {target}")
        if found is None:
            raise UserError(f"run folder {str(p)!r} holds no complete checkpoint to resume", "check --resume")
        return found
    if not p.exists():
        raise UserError(f"--resume {target!r} does not exist", "pass auto, a run folder or a checkpoint file")
    return p


def _latest_in(run_dir: Path, warn: Any, what: str) -> Path | None:
    """The folder's latest complete checkpoint; None if it holds none at all. Damaged ones are
    skipped with a warning when an older one is complete, and refused when none is: starting over
    would overwrite them (and the evidence) with a run from step 0."""
    skipped: list[str] = []
    found = ckpt.latest_checkpoint(run_dir, skipped.append)
    if found is None and skipped:
        names = [p.name for p in (run_dir / ckpt.CKPT_NAME, *ckpt.step_checkpoints(run_dir)) if p.exists()]
        raise UserError(
            f"{what}: no checkpoint in {str(run_dir)!r} is complete ({', '.join(names)}: damaged or not a "
            "gpt2 checkpoint); nothing was loaded",
            "restore a good copy, pass --resume FILE, or start a new run with another --out",
        )
    for text in skipped:
        warn(text)
    return found


def check_resume_compatible(spec: TrainSpec, saved: TrainSpec, saved_state: dict, plan: BatchPlan,
                            data_fingerprint: str | None) -> None:
    if spec.model.preset != saved.model.preset:
        # The stored shape wins over a preset given now, which would only relabel the model.
        raise UserError(
            f"cannot resume with another preset ({saved.model.preset} -> {spec.model.preset}): a resume keeps the "
            "model of the checkpoint",
            "drop --preset, or start a new run with another --out",
        )
    if spec.model.shape_fields() != saved.model.shape_fields():
        changed = [k for k, v in spec.model.shape_fields().items() if saved.model.shape_fields()[k] != v]
        raise UserError(
            f"cannot resume with a different model shape (changed: {', '.join(changed)})",
            "keep the model settings of the checkpoint, or start a new run with another --out",
        )
    if (spec.optim.name == "muon") != (saved.optim.name == "muon"):
        # Adam and AdamW keep the same state (moments per weight); Muon keeps a momentum per matrix.
        raise UserError(
            f"cannot resume with another optimizer ({saved.optim.name} -> {spec.optim.name}): the checkpoint holds "
            f"{saved.optim.name}'s state",
            f"keep --optimizer {saved.optim.name}, or start a new run from these weights with --init and another --out",
        )
    saved_batch = saved_state.get("global_batch")
    if saved_batch is not None and saved_batch != plan.global_batch:
        raise UserError(
            f"the global batch changed from {saved_batch} to {plan.global_batch} sequences "
            f"(batch_size x grad_accum x world size); resuming would skip or repeat data",
            "keep the global batch, e.g. with --batch-tokens",
        )
    saved_fp = saved_state.get("data_fingerprint")
    if saved_fp and data_fingerprint and saved_fp != data_fingerprint:
        raise UserError(
            "the training data differs from the data of the checkpoint (fingerprint mismatch)",
            "resume with the same --data folder",
        )


def preview_resume(spec: TrainSpec, plan: BatchPlan) -> str:
    """What --dry-run says of a resume: the checkpoint it would continue and from which step, with
    the same refusals the resume itself makes (model, batch, data, a budget already spent).
    Reads the checkpoint's spec and counters only (its tensors are memory-mapped, not read)."""
    from gpt2cli.data.prepare import embedded_data_dir
    from gpt2cli.data.shards import TokenFolder, is_token_folder

    run_dir = resolve_run_dir(spec, plan.world_size)
    warnings: list[str] = []
    resume_from = find_resume_checkpoint(spec, run_dir, warnings.append)
    if resume_from is None:
        return f"resume: no checkpoint in {run_dir} yet; the run starts at step 0"
    saved_state = ckpt.load_checkpoint(resume_from, verify=False)
    data_dir = Path(spec.data.dir) if spec.data.dir else embedded_data_dir()
    fingerprint = TokenFolder(data_dir).fingerprint if is_token_folder(data_dir) else None
    changes = check_resume(spec, resume_from, saved_state, plan, fingerprint)
    lines = [*warnings, f"resume: {resume_from} at step {int(saved_state['step']):,} of {plan.total_steps:,}"]
    if changes:
        lines.append("resume changes: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()))
    return "\n".join(lines)


def check_resume(spec: TrainSpec, resume_from: Path, saved_state: dict, plan: BatchPlan,
                 data_fingerprint: str | None) -> dict[str, list[Any]]:
    """Every refusal a resume makes of a checkpoint (the resume itself, and --dry-run's preview):
    no optimizer state, another model, batch or data, a budget already spent. Returns the
    settings it changes (:func:`changed_settings`)."""
    if "optimizer" not in saved_state:
        raise UserError(f"{str(resume_from)!r} holds no optimizer state", "resume from ckpt.pt, not best.pt")
    saved = spec_from_json(TrainSpec, saved_state["spec"])
    check_resume_compatible(spec, saved, saved_state, plan, data_fingerprint)
    step = int(saved_state["step"])
    if step > plan.total_steps:
        raise UserError(
            f"{str(resume_from)!r} is at step {step:,}, past the {plan.total_steps:,} steps asked for: there is "
            "nothing to train",
            f"pass --steps above {step:,} to continue the run",
        )
    return changed_settings(saved, spec)


# What a resume may change without it being a change of the run's settings: the budget and the
# places and ways it runs (folder, processes, devices, display). Every other setting a resume
# changes is reported and recorded (changed_settings).
_EXPECTED_TO_CHANGE = ("train.steps", "train.tokens", "train.device", "train.log_every", "train.profile",
                       "run.", "parallel.")


def changed_settings(saved: TrainSpec, spec: TrainSpec) -> dict[str, list[Any]]:
    """``{"optim.lr": [old, new], ...}``: the settings a resume changes, other than the budget and
    where and how it runs. Compared resolved, as spec.json holds them."""
    before, after = flatten(saved.model_dump(mode="json")), flatten(spec.model_dump(mode="json"))
    # A run from before the default warm-up was stored holds none: the one resolved now is no change.
    if before.get("optim.warmup") is None:
        before["optim.warmup"] = after.get("optim.warmup")
    return {name: [before.get(name), value] for name, value in after.items()
            if before.get(name) != value and not name.startswith(_EXPECTED_TO_CHANGE)}


# ------------------------------------------------------------------------------ main entry


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _WorkerStartup:
    """A torchrun worker from its start until its training loop takes over (:meth:`done`):

    - its parent (the torchrun agent) is watched from a thread: a worker still connecting to the
      rendezvous store, loading data or building the model when `gpt2 train` and torchrun are
      killed outright would otherwise wait out the store's timeout (``--dist-timeout``) before it
      noticed; the loop's own check covers the steps after;
    - SIGINT/SIGTERM (what torchrun forwards when the run is stopped), or the agent gone, end it
      at once and quietly: there is nothing to checkpoint yet, and the launcher says what
      happened, once.

    Off the main thread (tests) only the watch runs."""

    POLL_S = 0.2

    def __init__(self, rank: int) -> None:
        from gpt2cli.torchrun import AGENT_PID_ENV

        self.rank = rank
        self.parent = int(os.environ.get(AGENT_PID_ENV) or os.getppid())
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._stop_quietly)
            except ValueError:  # not the main thread
                pass
        threading.Thread(target=self._watch, name="gpt2-orphan-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            if os.getppid() != self.parent:
                # Quietly, like a signal here: nothing was written yet, and the launcher (if it
                # lives) says what happened. torchrun stopped during its own start-up can exit
                # before it holds the workers it just spawned, so they learn it only this way.
                self._stop_quietly(signal.SIGTERM, None)
            if self._done.wait(self.POLL_S):
                return

    @staticmethod
    def _stop_quietly(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(128 + signum)

    def done(self) -> None:
        """The loop takes over: its checks and its signal handling (checkpoint, then stop)."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def train(spec: TrainSpec, reporter: Reporter | None = None, strategy: Strategy | None = None) -> TrainResult:
    """Run (or resume) a training run described by ``spec``.

    The spec is validated again (one built with ``model_copy(update=...)`` skipped validation).
    Several processes (parallel.nproc, gpus or nnodes) need torchrun's workers, a process group
    of that size made by the caller, or a ``strategy`` given here. The global torch RNG and
    float32 matmul precision are as they were when this returns."""
    spec = _revalidate(spec)
    if strategy is None:
        _check_launched(spec.parallel)
    reporter = reporter or SilentReporter()
    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ  # started by torchrun
    startup = _WorkerStartup(int(os.environ["RANK"])) if worker else None
    try:
        return _train(spec, reporter, strategy, startup)
    finally:
        if startup is not None:
            startup.done()


def _revalidate(spec: TrainSpec) -> TrainSpec:
    """The spec as validation leaves it (a no-op for one that was validated): every resolved
    value round-trips, as spec.json does; a bad value is a UserError, not a run of -3 steps."""
    return validate_spec(type(spec), spec.model_dump())


def _check_launched(p: ParallelSpec) -> None:
    """Several processes asked for, but this is one process that no launcher started: training
    here would be one process of a run whose spec says several."""
    from gpt2cli.parallel.launch import under_torchrun

    world = p.procs_per_node * p.nnodes
    if world <= 1 or under_torchrun():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
        return  # the caller made a process group of that size (e.g. torch.multiprocessing.spawn)
    given = f"{'gpus' if p.gpus else 'nproc'} {p.procs_per_node}" + (f" x nnodes {p.nnodes}" if p.nnodes > 1 else "")
    raise UserError(
        f"{given} ({world} processes) needs the launcher, and train() was called in one process",
        "run `gpt2 train` (it starts torchrun), start this under torchrun, or pass a strategy",
    )


def _train(spec: TrainSpec, reporter: Reporter, strategy: Strategy | None,
           startup: _WorkerStartup | None) -> TrainResult:
    p = spec.parallel
    strategy = strategy or make_strategy(
        p.strategy, spec.train.device, activation_checkpointing=p.activation_checkpointing,
        dist_timeout=p.dist_timeout, fsdp_reshard_after_forward=p.fsdp_reshard_after_forward,
        fsdp_cpu_offload=p.fsdp_cpu_offload,
    )
    # The run seeds the global RNG (model init, every step, a resume's saved state) and sets TF32
    # matmuls on CUDA: the caller's process gets both back as they were, whatever happens.
    precision = torch.get_float32_matmul_precision()
    try:
        with torch.random.fork_rng(devices=[strategy.device] if strategy.device.type == "cuda" else []):
            return _train_with(spec, reporter, strategy, startup)
    finally:
        torch.set_float32_matmul_precision(precision)
        strategy.release_host_memory()


def _train_with(spec: TrainSpec, reporter: Reporter, strategy: Strategy,
                startup: _WorkerStartup | None) -> TrainResult:
    strategy.setup()
    trainer = _Trainer(spec, strategy, reporter)
    if startup is not None:
        trainer.startup_done = startup.done
    try:
        try:
            result = trainer.run()
        except torch.cuda.OutOfMemoryError as exc:
            raise UserError(
                f"CUDA ran out of memory with --batch-size {spec.train.batch_size} x --seq-len {spec.seq_len}",
                "use a smaller --batch-size with a larger --grad-accum (same global batch), "
                "--activation-checkpointing, or --strategy fsdp",
            ) from exc
    except Exception as exc:
        trainer.record_failure(exc)
        raise
    finally:
        trainer.release_run_folder()
    # Only a clean run tears the process group down: after a failure a peer may be gone, and
    # destroying a group with pending work can block; the process exit releases it instead.
    strategy.teardown()
    return result


class _Trainer:
    def __init__(self, spec: TrainSpec, strategy: Strategy, reporter: Reporter) -> None:
        self.strategy = strategy
        self.reporter = reporter if strategy.is_main else SilentReporter()
        self.device = strategy.device
        self.dtype = resolve_dtype(spec.train.dtype, self.device)
        self.plan = plan_batches(spec, strategy.world_size)
        if spec.optim.warmup is None:
            # The default warm-up (5% of the steps) is fixed when the run starts and stored with it:
            # a resume with a larger budget keeps the warm-up the run had (what a wsd run needs to
            # extend exactly), instead of a longer one that would rewrite its past.
            warmup = warmup_steps(spec, self.plan.total_steps)
            spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"warmup": warmup})})
        self.spec = spec
        compile_flag = spec.train.compile
        self.compiled = self.device.type == "cuda" if compile_flag is None else compile_flag
        self.loss_chunk = resolve_loss_chunk(spec.train.loss_chunk, self.compiled, self.device)
        # (run folder, step being taken) once the folder says "running": where a failure is recorded.
        self.running_at: tuple[Path, int] | None = None
        self.startup_done: Callable[[], None] = lambda: None  # called as the training loop begins
        self.run_lock: FolderLock | None = None

    def lock_run_folder(self, run_dir: Path) -> None:
        """One run at a time in a folder: a second `gpt2 train` (a resume of a run still going, or
        two new runs started together) would interleave metrics rows and overwrite checkpoints.
        The process that writes the folder holds the lock: this one, or the launcher of a
        multi-process run (which says so in the workers' environment). Before the folder exists
        there is nothing to lock; called again once it is made."""
        from gpt2cli.parallel.launch import RUN_LOCKED_ENV

        if not self.strategy.is_main or os.environ.get(RUN_LOCKED_ENV) == str(run_dir.resolve()):
            return
        self.run_lock = self.run_lock or FolderLock(run_dir)
        take_run_folder(self.run_lock)

    def release_run_folder(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def record_failure(self, exc: Exception) -> None:
        """status.json says "failed", with the error's line, rather than "running" forever."""
        if self.running_at is None or not self.strategy.is_main:
            return
        run_dir, step = self.running_at
        with contextlib.suppress(OSError):
            write_status(run_dir, "failed", step, self.plan.total_steps, error=str(exc).splitlines()[0][:500])

    # ------------------------------------------------------------------ build
    def _open_data(self):
        from gpt2cli.data import TokenFolder, TrainLoader, default_data_dir
        from gpt2cli.data.loader import count_windows

        folder = TokenFolder(Path(self.spec.data.dir) if self.spec.data.dir else default_data_dir())
        for split in (self.spec.data.train_split, self.spec.data.val_split):
            if split not in folder.splits:
                # A folder prepared with --val-fraction 0 has no "val": say how to get one. Another
                # name is a setting to correct.
                no_val = (split == self.spec.data.val_split == "val" and self.spec.data.train_split in folder.splits)
                field = "data.val_split" if split == self.spec.data.val_split else "data.train_split"
                raise UserError(
                    f"data folder {str(folder.path)!r} has no {split!r} split (it has: {', '.join(folder.splits)})",
                    "prepare it again with a --val-fraction above 0, or score the training split: "
                    f"--set data.val_split={self.spec.data.train_split}" if no_val
                    else f"set {field} to one of {', '.join(folder.splits)}",
                )
        # Both splits, before any step: a validation split shorter than one window used to surface
        # only at the first evaluation, after the run folder was made and steps were spent.
        for split, remedy in ((self.spec.data.train_split, "prepare more data"),
                              (self.spec.data.val_split, "prepare the data with a larger --val-fraction")):
            num_tokens = len(folder.tokens(split))
            if count_windows(num_tokens, self.plan.seq_len) < 1:
                raise UserError(
                    f"the {split!r} split of {str(folder.path)!r} has {num_tokens:,} tokens, fewer than one "
                    f"window of seq_len + 1 = {self.plan.seq_len + 1:,}",
                    f"use a shorter --seq-len, or {remedy}",
                )
        if folder.meta.get("vocab_size", self.spec.model.vocab_size) > self.spec.model.vocab_size:
            raise UserError(
                f"the data's vocabulary ({folder.meta['vocab_size']}) exceeds model.vocab_size "
                f"({self.spec.model.vocab_size})", "use a model with the data's vocabulary",
            )
        loader = TrainLoader(
            folder.tokens(self.spec.data.train_split), batch_size=self.plan.batch_size,
            seq_len=self.plan.seq_len, seed=self.spec.train.seed, rank=self.strategy.rank,
            world_size=self.strategy.world_size, device=self.device, vocab_size=self.spec.model.vocab_size,
        )
        return folder, loader

    def _read_init(self) -> tuple[dict[str, torch.Tensor], str]:
        """The state dict of the weights ``run.init`` names and how to name them: their shape
        must be the run's (the CLI checked it from their spec; a --spec file or a file replaced
        since is checked here), and every value finite."""
        from gpt2cli.loading import load_model, refuse_nonfinite_weights

        loaded = load_model(self.spec.run.init, "cpu")
        ours, theirs = self.spec.model.shape_fields(), loaded.spec.shape_fields()
        if ours != theirs:
            changed = ", ".join(f"{k} {ours[k]} (the weights: {theirs[k]})" for k in ours if ours[k] != theirs[k])
            raise UserError(f"run.init {loaded.source}: the run's model has another shape: {changed}",
                            "start from weights of the run's shape, or leave out the model settings")
        refuse_nonfinite_weights(loaded.model, loaded.source)
        return loaded.model.state_dict(), loaded.source

    def _check_same_init_everywhere(self, state: dict[str, torch.Tensor]) -> None:
        """Every process reads run.init itself: a file replaced meanwhile (the best.pt of a run
        still training) would give the replicas different weights, silently. A sum of every
        weight, compared across ranks, refuses that."""
        if self.strategy.world_size == 1:
            return
        if not _same_on_every_rank(self.strategy, self.device, sum(float(t.double().sum()) for t in state.values())):
            raise UserError(f"the processes read different weights from run.init {self.spec.run.init!r}: it changed "
                            "while the run started", "start from a file that is not being rewritten")

    def _read_hellaswag(self):
        """eval.hellaswag's examples as token rows for the trained context (plan.seq_len: positions
        past it are untrained), read (and downloaded, the first time) before the run folder appears.
        Every process reads them itself, so they are compared: a file rewritten meanwhile, or a
        cache that differs between nodes, would give the ranks different examples."""
        from gpt2cli.hellaswag import TASK, encode_examples, read_examples

        examples = read_examples(TASK.fetch(self.spec.eval.hellaswag), self.spec.eval.hellaswag_examples)
        encoded = encode_examples(examples, self.plan.seq_len)
        if self.strategy.world_size > 1:
            digest = hashlib.sha256(b"".join(row.tobytes() for e in encoded for row in e.rows)).digest()
            if not _same_on_every_rank(self.strategy, self.device, int.from_bytes(digest[:6], "big")):  # 48 bits: exact in a float64
                raise UserError(f"the processes read different examples from eval.hellaswag {self.spec.eval.hellaswag!r}",
                                "give every node the same file")
        return encoded

    def _build_model(self, *, weights_follow: bool = False) -> tuple[GPT, nn.Module]:
        """The model, wrapped for the strategy (and compiled). ``weights_follow``: a state dict
        (--init) is loaded next, so the random initialisation is skipped."""
        torch.manual_seed(self.spec.train.seed)  # identical initialisation on every rank
        if weights_follow:
            model = GPT.uninitialised(self.spec.model, self.device)
        else:
            model = GPT(self.spec.model).to(self.device)
        trained = self.strategy.wrap(model)
        if self.compiled:
            trained = torch.compile(trained)
        return model, trained

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        spec, strategy, reporter, plan = self.spec, self.strategy, self.reporter, self.plan
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        check_requirements(spec)
        hellaswag = self._read_hellaswag() if spec.eval.hellaswag is not None else None
        run_dir = resolve_run_dir(spec, strategy.world_size)
        # An auto-named run gets a folder of its own when it is made (claim_new_folder): the
        # name is a first choice, and a run already there (same second) is no conflict.
        auto_named = spec.run.out is None and spec.run.resume is None
        if not auto_named:
            self.lock_run_folder(run_dir)
        folder, loader = self._open_data()
        resume_from = find_resume_checkpoint(spec, run_dir, reporter.message)
        if not auto_named:
            refuse_existing_run(spec, run_dir)
        saved_state: dict[str, Any] | None = None
        resume_changes: dict[str, list[Any]] = {}
        if resume_from is not None:
            saved_state = ckpt.load_checkpoint(resume_from)
            resume_changes = check_resume(spec, resume_from, saved_state, plan, folder.fingerprint)
            written_by = str(saved_state.get("torch_version", ""))
            running = torch.__version__.split("+")[0]
            if written_by and written_by != running:
                # Resume is exact within one torch version; another may round (kernels, RNG
                # streams, optimizer code) differently. Not an error: the run continues.
                reporter.message(
                    f"warning: {str(resume_from)!r} was written by torch {written_by}, this is torch {running}: "
                    "the continuation may differ in the last bits from an uninterrupted run"
                )

        # Fine-tuning: the weights are read (and checked) before the run folder appears. A resume
        # has its own weights in the checkpoint, and a run started from --init keeps it in its spec.
        init_state, init_source = (self._read_init() if resume_from is None and spec.run.init is not None
                                   else (None, None))

        model, trained = self._build_model(weights_follow=init_state is not None)
        if init_state is not None:
            self._check_same_init_everywhere(init_state)
            strategy.load_model_state(trained, init_state)
            init_state = None  # the model holds the weights now
        optimizer = build_optimizer(trained, spec, self.device)
        step, tokens_seen, best_val = 0, 0, math.inf
        evals_since_best = 0  # evaluations in a row without a new best (--patience)
        if saved_state is not None:
            strategy.load_model_state(trained, saved_state["model"])
            strategy.load_optimizer_state(trained, optimizer, saved_state["optimizer"])
            # The loaded state brings the checkpoint's betas, eps, weight decay, momentum (and
            # device flags such as fused): the spec's, which a resume may change, go back in.
            keep_settings_of(optimizer, build_optimizer(trained, spec, self.device))
            loader.load_state_dict(saved_state["loader"])
            step = int(saved_state["step"])
            tokens_seen = int(saved_state["tokens_seen"])
            # A fork (a checkpoint of another run, into this folder) starts its own best model:
            # the source's best val loss belongs to a best.pt this folder does not hold.
            forked = resume_from is not None and resume_from.resolve().parent != run_dir.resolve()
            best_val = math.inf if forked else float(saved_state["best_val_loss"])
            evals_since_best = 0 if forked else int(saved_state.get("evals_since_best", 0))
            _restore_rng(saved_state.get("rng", {}), self.device)
        # The step this process starts (or resumes) at: every metrics row carries it, as gpt2
        # compare's segment boundary. The checkpoint's tensors are in the model and optimizer now.
        start_step = step
        saved_state = None

        # Validation passed: only now does the run folder appear.
        if strategy.is_main:
            if auto_named:
                run_dir = claim_new_folder(run_dir)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            self.lock_run_folder(run_dir)
            resolved = spec.model_copy(update={"run": spec.run.model_copy(update={"out": str(run_dir)})})
            ckpt.atomic_write_bytes(run_dir / "spec.json", lambda f: f.write(spec_to_json(resolved).encode()))
            if spec.run.resume is not None:
                # Rows written after the checkpoint (or, starting over, all rows of an attempt that
                # died before its first checkpoint) are recomputed: each step stays once in the file.
                truncate_metrics(run_dir / "metrics.jsonl", step)
                for stale in ckpt.remove_stale_temp_files(run_dir):
                    reporter.message(f"removed {stale.name}, left by a checkpoint write that did not finish")
            write_status(run_dir, "running", step, plan.total_steps)
            self.running_at = (run_dir, step)
        strategy.barrier()
        mirrors: list[Any] = []
        if spec.run.tensorboard and strategy.is_main:
            mirrors.append(TensorBoardWriter(
                run_dir / TENSORBOARD_DIR,
                # Resumed (or started over): hide what an earlier attempt logged past this start.
                purge_step=step + 1 if spec.run.resume is not None else None,
                spec_json=spec_to_json(spec) if step == 0 else None,
            ))
        if spec.run.wandb and strategy.is_main:
            mirrors.append(_start_wandb(run_dir, spec))
        metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=strategy.is_main, mirrors=tuple(mirrors))
        if resume_changes:
            # spec.json now describes the continuation; the run's earlier settings stay on record.
            metrics.write({"kind": "resume", "step": step, "tokens": tokens_seen, "changed": resume_changes})
            listed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in resume_changes.items())
            reporter.message(f"warning: resuming with changed settings: {listed} (spec.json now holds the new "
                             "ones; metrics.jsonl records the change)")

        from gpt2cli.modelinfo import model_stats

        stats = model_stats(spec.model, seq_len=plan.seq_len)
        flops_per_token = stats["flops_per_token"]
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        peak = peak_flops(device_name)
        reporter.start({
            "run_dir": str(run_dir), "device": str(self.device), "device_name": device_name or self.device.type,
            "dtype": str(self.dtype).replace("torch.", ""), "strategy": strategy.name,
            "world_size": strategy.world_size, "params": stats["params"], "batch_size": plan.batch_size,
            "seq_len": plan.seq_len, "grad_accum": plan.grad_accum, "global_batch": plan.global_batch,
            "tokens_per_step": plan.tokens_per_step, "total_steps": plan.total_steps, "start_step": start_step,
            "resumed_from": str(resume_from) if resume_from else None, "data": str(folder.path),
            "init": init_source,
        })
        warmup = warmup_steps(spec, plan.total_steps)
        if warmup > plan.total_steps:
            reporter.message(
                f"warning: --warmup {warmup:,} is longer than the run's {plan.total_steps:,} steps: the learning "
                f"rate peaks at {lr_at(plan.total_steps - 1, spec, plan.total_steps):.3g}, not --lr {spec.optim.lr:g}"
            )

        scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        val_tokens = folder.tokens(spec.data.val_split)
        last_val: float | None = None
        last_train: float | None = None
        status = "completed"
        consecutive_skips = 0
        window_start, window_tokens = time.perf_counter(), 0
        ckpt_path: Path | None = None
        best_path = run_dir / ckpt.BEST_NAME if (run_dir / ckpt.BEST_NAME).exists() else None

        def save(step_now: int) -> Path:
            path = run_dir / ckpt.CKPT_NAME
            payload = {
                "spec": spec_to_json(spec),
                "model": strategy.model_state(trained),
                "optimizer": strategy.optimizer_state(trained, optimizer),
                "loader": loader.state_dict(),
                "rng": _rng_state(self.device),
                "step": step_now,
                "tokens_seen": tokens_seen,
                "best_val_loss": best_val,
                "evals_since_best": evals_since_best,
                "world_size": strategy.world_size,
                "global_batch": plan.global_batch,
                "data_fingerprint": folder.fingerprint,
            }
            if strategy.is_main:
                ckpt.save_checkpoint(path, payload)
                if spec.run.keep:
                    _keep_step_copy(run_dir, path, step_now, spec.run.keep, reporter.message)
                # status.json follows the checkpoints: a run killed outright says how far it got.
                write_status(run_dir, "running", step_now, plan.total_steps)
            strategy.barrier()
            return path

        def score_hellaswag() -> dict[str, Any]:
            from gpt2cli.hellaswag import score_on_ranks

            t0 = time.perf_counter()
            # The bare model, FSDP's hooks included: neither DDP's wrapper (nothing to synchronise
            # without gradients) nor torch.compile's (each batch's width would be a new graph).
            score = score_on_ranks(model, hellaswag, batch_size=spec.eval_batch_size, strategy=strategy,
                                   autocast=lambda: autocast_context(self.device, self.dtype), device=self.device)
            return {"hellaswag_acc": score.acc, "hellaswag_acc_norm": score.acc_norm,
                    "hellaswag_examples": score.examples, "hellaswag_truncated": score.truncated,
                    "hellaswag_nonfinite": score.nonfinite, "hellaswag_s": time.perf_counter() - t0}

        def run_eval(step_now: int) -> float:
            nonlocal best_val, best_path, evals_since_best
            t0 = time.perf_counter()
            val = evaluate_loss(
                trained, val_tokens, seq_len=plan.seq_len, batch_size=spec.eval_batch_size,
                max_tokens=spec.eval.tokens, strategy=strategy,
                autocast=lambda: autocast_context(self.device, self.dtype), loss_chunk=self.loss_chunk,
                vocab_size=spec.model.vocab_size, device=self.device,
            )
            row = {"kind": "eval", "step": step_now, "tokens": tokens_seen, "val_loss": val,
                   "val_ppl": perplexity(val), "eval_s": time.perf_counter() - t0,
                   "time_s": time.perf_counter() - started,
                   "start_step": start_step}
            if hellaswag is not None:
                row.update(score_hellaswag())
            improved = val < best_val
            evals_since_best = 0 if improved else evals_since_best + 1
            if improved:
                best_val = val
                state = strategy.model_state(trained)
                if strategy.is_main:
                    best_path = run_dir / ckpt.BEST_NAME
                    ckpt.save_checkpoint(best_path, {"spec": spec_to_json(spec), "model": state,
                                                     "step": step_now, "tokens_seen": tokens_seen,
                                                     "val_loss": val})
                strategy.barrier()
            row["best"] = improved
            metrics.write(row)
            reporter.evaluation(row)
            return val

        profiler = StepProfiler(run_dir, spec.train.profile, first_step=step, total_steps=plan.total_steps,
                                device=self.device, enabled=strategy.is_main)

        def report_profile(paths: list[Path]) -> None:
            if paths:
                reporter.message(f"profile of {profiler.steps} step(s): {paths[0]} (open in ui.perfetto.dev), "
                                 f"top ops in {paths[1]}")

        trained.train()
        # A worker whose launcher (the torchrun agent) was killed outright is re-parented: it stops.
        parent = os.getppid() if strategy.world_size > 1 else None
        self.startup_done()
        with _StopRequest() as stop:
            while step < plan.total_steps:
                if parent is not None and os.getppid() != parent:
                    _exit_orphaned(strategy.rank, parent)
                if _fault_at("crash_at_step", step, strategy.rank):
                    os._exit(1)
                if _fault_at("hang_at_step", step, strategy.rank):
                    # A peer that stops taking part in collectives (it still dies on SIGTERM, so
                    # torchrun can clean up without its 30 s SIGKILL grace).
                    while stop.signal is None:
                        time.sleep(0.1)
                    os._exit(1)
                if _fault_at("stop_at_step", step + 1, strategy.rank):
                    stop.signal = signal.SIGTERM  # as if SIGTERM arrived during this step
                profiler.before_step(step)
                # Dropout randomness is a pure function of (seed, rank, step): resume is exact on every rank.
                torch.manual_seed(spec.train.seed * 1_000_003 + strategy.rank * 7_919 + step)
                lr = lr_at(step, spec, plan.total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                step_loss = torch.zeros((), device=self.device)
                for micro in range(plan.grad_accum):
                    x, y = loader.next_batch()
                    last_micro = micro == plan.grad_accum - 1
                    sync = contextlib.nullcontext() if last_micro else strategy.no_sync(trained)
                    with sync:
                        with autocast_context(self.device, self.dtype):
                            loss = trained(x, targets=y, loss_chunk=self.loss_chunk) / plan.grad_accum
                        if _fault_at("nan_at_step", step, strategy.rank):
                            loss = loss * float("nan")
                        (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += loss.detach()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = strategy.clip_grad_norm(trained, spec.optim.grad_clip)

                # The one host sync of a step: is the update finite, and was a stop requested
                # (agreed across ranks, so every process stops at the same step)?
                nonfinite, stop_now = _agree(strategy, ~torch.isfinite(grad_norm), stop.signal is not None, self.device)
                if _fault_at("late_stop_at_step", step + 1, strategy.rank):
                    stop.signal = signal.SIGTERM  # as if SIGTERM arrived just after the ranks agreed
                if nonfinite and scaler is None:
                    optimizer.zero_grad(set_to_none=True)
                    # Counted from 1, as the logs and metrics rows count steps (step is the 0-based index).
                    msg = f"non-finite loss or gradient at step {step + 1}"
                    # --max-nonfinite-skips N: N steps in a row may be skipped; the (N+1)-th stops the run.
                    if spec.train.on_nonfinite == "stop" or consecutive_skips >= spec.train.max_nonfinite_skips:
                        metrics.close()
                        where = f"; the last checkpoint {ckpt_path} holds finite values" if ckpt_path else ""
                        skipping = spec.train.on_nonfinite == "skip"
                        raise NonFiniteLossError(
                            msg + (f", {consecutive_skips + 1} in a row" if skipping else "")
                            + " (the optimizer step was not taken" + where + ")",
                            "lower --lr, raise --warmup, use --grad-clip, or "
                            + (f"raise --max-nonfinite-skips (now {spec.train.max_nonfinite_skips})" if skipping
                               else "--on-nonfinite skip"),
                        )
                    consecutive_skips += 1
                    reporter.message(f"{msg}: step skipped ({consecutive_skips} in a row)")
                else:
                    consecutive_skips = 0
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                # The steps done, for status.json if the run fails from here on (in evaluation, a
                # checkpoint or the next step). Set before the loop for the first.
                self.running_at = (run_dir, step) if strategy.is_main else None
                reporter.advance(step)
                report_profile(profiler.after_step(step))
                tokens_seen += plan.tokens_per_step
                window_tokens += plan.tokens_per_step

                is_log = step % spec.train.log_every == 0 or step == plan.total_steps or stop_now
                if is_log:
                    loss_value = float(strategy.all_reduce_mean(step_loss).item())
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    last_train = loss_value
                    row = {"kind": "train", "step": step, "tokens": tokens_seen, "loss": loss_value,
                           "lr": lr, "grad_norm": float(grad_norm.item()), "tokens_per_s": tok_s,
                           "time_s": now - started,
                           # Per segment: a resume may change them (gpt2 compare shows ddp→fsdp).
                           "strategy": strategy.name, "world_size": strategy.world_size,
                           "start_step": start_step}
                    utilisation = mfu(flops_per_token, tok_s, peak)
                    if utilisation is not None:
                        row["mfu"] = utilisation
                    row.update(_memory(self.device))
                    metrics.write(row)
                    reporter.step({**row, "total_steps": plan.total_steps})

                is_eval = step % spec.eval.every == 0 or step == plan.total_steps
                is_save = step % spec.save_every == 0 or step == plan.total_steps or stop_now
                if (is_eval or is_save) and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the step's queued work is training time
                paused_at = time.perf_counter()
                if is_eval:
                    last_val = run_eval(step)
                    trained.train()
                # The val loss is the same number on every rank (reduced), so every rank stops here.
                stop_early = (is_eval and spec.eval.patience is not None and step < plan.total_steps
                              and evals_since_best >= spec.eval.patience)
                if is_save or stop_early:
                    ckpt_path = save(step)
                # Evaluation and checkpoints are not training: the window (tokens/s, MFU) skips
                # their time; time_s stays wall-clock.
                window_start += time.perf_counter() - paused_at
                if stop_early and not stop_now:
                    status = "early-stopped"
                    reporter.message(
                        f"stopped early after step {step}: the val loss has not improved for {evals_since_best} "
                        f"evaluations (--patience {spec.eval.patience}); best.pt holds the best, val loss {best_val:.4f}"
                    )
                    break
                if stop_now:
                    status = "interrupted"
                    reporter.message(
                        f"stopped by {_stopped_by(stop.signal)} "
                        f"after step {step}; "
                        f"checkpoint written, continue with --resume auto"
                    )
                    break
        late_signal = stop.signal if status != "interrupted" else None
        if late_signal is not None:
            reporter.message(f"{_stopped_by(late_signal)} came during the last step; the run completed")
        report_profile(profiler.close())  # a run stopped before the profiled steps ended
        metrics.close()
        if strategy.is_main:
            write_status(run_dir, status, step, plan.total_steps)
        result = TrainResult(
            run_dir=run_dir, status=status, step=step, total_steps=plan.total_steps,
            tokens_seen=tokens_seen, train_loss=last_train, val_loss=last_val,
            best_val_loss=None if math.isinf(best_val) else best_val,
            wall_s=time.perf_counter() - started,
            checkpoint=next((p for p in (ckpt_path, run_dir / ckpt.CKPT_NAME) if p and p.exists()), None),
            best=best_path, late_signal=late_signal,
        )
        reporter.end(result)
        return result


def _stopped_by(signum: int | None) -> str:
    """The signal to name in the "stopped by" line: the one the user sent to the launcher of a
    multi-process run (torchrun passes a Ctrl-C on as SIGTERM), or this process's."""
    from gpt2cli.parallel.launch import launcher_stop_signal

    if signum is None:
        return "another rank"
    return launcher_stop_signal() or signal.Signals(signum).name


def write_status(run_dir: Path, status: str, step: int, total_steps: int, error: str | None = None) -> None:
    """status.json: running | completed | early-stopped | interrupted | failed (with the error's line). Only a
    process stopped outright (SIGKILL, a second Ctrl-C, power) leaves "running" behind. Lets the
    torchrun launcher report an interrupted run, and `gpt2 compare` show how a run ended."""
    record = {"status": status, "step": step, "total_steps": total_steps, "updated": datetime.now().isoformat()}
    if error is not None:
        record["error"] = error
    ckpt.atomic_write_bytes(run_dir / STATUS_NAME, lambda f: f.write(json.dumps(record).encode()))


def _exit_orphaned(rank: int, parent: int) -> None:
    """The process that started this worker (torchrun's agent) is gone, e.g. killed with SIGKILL
    together with `gpt2 train`. Stop at once and write nothing more, so that a resumed run never
    shares its folder with a stray worker; the last complete checkpoint stays the resume point."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"Error: [rank {rank}] the launcher (pid {parent}) is gone; stopping without a checkpoint "
                         "(continue with --resume auto)\n")
        sys.stderr.flush()
    os._exit(1)


def _agree(strategy: Strategy, nonfinite: torch.Tensor, stop: bool, device: torch.device) -> tuple[bool, bool]:
    flags = torch.stack([nonfinite.to(torch.float32).reshape(()),
                         torch.tensor(1.0 if stop else 0.0, device=nonfinite.device)])
    values = strategy.all_reduce_max(flags).tolist()
    return values[0] > 0, values[1] > 0


def _memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        import resource

        return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    except ImportError:  # not on POSIX
        return {}


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _keep_step_copy(run_dir: Path, path: Path, step: int, keep: int, warn: Any) -> None:
    """Keep step-N.pt beside ckpt.pt (a hard link: no second write), then prune to the last K.
    The old file is removed only after the new one exists; a failed delete is only a warning."""
    target = run_dir / ckpt.step_checkpoint_name(step)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        os.link(path, tmp)
    except OSError:
        import shutil

        shutil.copy2(path, tmp)
    os.replace(tmp, target)
    for old in ckpt.step_checkpoints(run_dir)[:-keep]:
        try:
            old.unlink()
        except OSError as exc:
            warn(f"could not delete old checkpoint {old}: {exc}")
