"""Re-invoking `gpt2 train` under torchrun when several processes are asked for.

The parent validates the spec, writes it to the run folder and runs
``python -m torch.distributed.run ... -m gpt2cli train --spec <run>/spec.json``; the workers get
exactly the validated spec. The parent streams their output (they inherit its stdout/stderr),
forwards SIGINT/SIGTERM to torchrun (which forwards them to the workers) and exits with
torchrun's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from gpt2cli.errors import UserError
from gpt2cli.specs import ParallelSpec

LAUNCH_SPEC_NAME = "launch-spec.json"  # spec.json is written by the workers themselves


def under_torchrun() -> bool:
    """True inside a torchrun worker (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(p: ParallelSpec) -> bool:
    return not under_torchrun() and p.procs_per_node * p.nnodes > 1


def check_gpus(p: ParallelSpec) -> None:
    """--gpus N on a machine with fewer GPUs: a clear error with the number found."""
    if p.gpus is None:
        return
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if p.gpus > found:
        raise UserError(
            f"--gpus {p.gpus} asked for, but this machine has {found} CUDA GPU(s)",
            "use --gpus with at most that number, or --nproc N --device cpu",
        )


def torchrun_command(p: ParallelSpec, spec_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p.procs_per_node)]
    if p.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(p.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(p.rdzv_endpoint),
                "--rdzv-id", p.rdzv_id]
        if p.node_rank is not None:
            cmd += ["--node-rank", str(p.node_rank)]
    if p.max_restarts:
        cmd += ["--max-restarts", str(p.max_restarts)]
    return [*cmd, "-m", "gpt2cli", "train", "--spec", str(spec_path)]


def launch(p: ParallelSpec, spec_path: Path, debug: bool = False) -> int:
    """Run the workers under torchrun; return its exit code."""
    cmd = torchrun_command(p, spec_path)
    if debug:
        cmd.append("--debug")
    env = dict(os.environ)
    # torchrun would set 1 thread per worker with a warning; say it ourselves, sized to the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.procs_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
