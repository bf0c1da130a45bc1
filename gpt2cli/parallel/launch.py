"""Re-invoking `gpt2 train` under torchrun when several processes are asked for.

The parent validates the spec, writes it to the run folder and runs
``python -m gpt2cli.torchrun ... -m gpt2cli train --spec <run>/spec.json`` (torchrun, quiet
when stopped by a signal); the workers get
exactly the validated spec. The parent streams their output (they inherit its stdout/stderr),
forwards SIGINT/SIGTERM to torchrun (which forwards them to the workers) and exits with
torchrun's exit code, or with a worker's UserError (printed once, its own exit code: 2 for bad
input, 3 for a non-finite loss). torchrun dies with the parent (Linux), and workers whose torchrun
is gone stop (gpt2cli.train), so killing `gpt2 train` never leaves training processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from gpt2cli.errors import UserError
from gpt2cli.specs import ParallelSpec

LAUNCH_SPEC_NAME = "launch-spec.json"  # spec.json is written by the workers themselves
# Workers started by `launch` leave a UserError here for the launcher, which prints it once and
# exits with its code (a worker exiting non-zero would make torchrun print a traceback and exit 1).
LAUNCH_DIR_ENV = "GPT2CLI_LAUNCH_DIR"
WORKER_ERROR_PREFIX = ".worker-error-rank"
# The launcher holds the run folder's lock (gpt2cli.fsutil.FolderLock) for its workers: the
# resolved folder it locked, so that rank 0 does not try to take it again.
RUN_LOCKED_ENV = "GPT2CLI_RUN_LOCKED"
# The signal the launcher got, for the workers' "stopped by" line: torchrun passes a SIGINT on to
# them as SIGTERM (gpt2cli.torchrun), and the user pressed Ctrl-C.
STOP_SIGNAL_FILE = ".stop-signal"


def launcher_stop_signal() -> str | None:
    """In a worker started by :func:`launch`: the name of the signal that stopped the launcher."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder:
        return None
    try:
        return (Path(folder) / STOP_SIGNAL_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


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
    if found == 0:
        raise UserError(f"--gpus {p.gpus} needs CUDA GPUs, and this machine has none",
                        f"on the CPU use --strategy {p.strategy if p.strategy != 'single' else 'ddp'} "
                        f"--nproc {p.gpus} --device cpu")
    if p.gpus > found:
        raise UserError(
            f"--gpus {p.gpus} asked for, but this machine has {found} CUDA GPU(s)",
            "use --gpus with at most that number, or --nproc N --device cpu",
        )


def check_rendezvous(p: ParallelSpec) -> None:
    """A multi-node job needs --rdzv-endpoint HOST:PORT with a host that resolves, and a
    --node-rank below --nnodes; torchrun would otherwise print a C++ stack or wait for ever."""
    if p.nnodes == 1:
        return
    if p.node_rank is not None and p.node_rank >= p.nnodes:
        raise UserError(f"--node-rank {p.node_rank} is not below --nnodes {p.nnodes}", "number the nodes 0 .. nnodes-1")
    host, sep, port = (p.rdzv_endpoint or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {p.rdzv_endpoint!r} is not HOST:PORT",
                        "the address of node 0 and a free port, e.g. --rdzv-endpoint 10.0.0.1:29500")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as exc:
        raise UserError(f"--rdzv-endpoint {p.rdzv_endpoint!r}: cannot resolve the host {host!r}",
                        "check the name or use the IP address of node 0") from exc


# torch.distributed.run, with a quiet exit when it is stopped by a signal (see that module).
TORCHRUN_MODULE = "gpt2cli.torchrun"


def torchrun_command(p: ParallelSpec, spec_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", TORCHRUN_MODULE, "--nproc-per-node", str(p.procs_per_node)]
    if p.nnodes == 1:
        # Workers meet at 127.0.0.1 (the stores listen there only, see gpt2cli.torchrun), not at
        # this machine's name, which may resolve to an address other machines reach.
        cmd += ["--standalone", "--local-addr", "127.0.0.1"]
    else:
        cmd += ["--nnodes", str(p.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(p.rdzv_endpoint),
                "--rdzv-id", p.rdzv_id]
        if p.node_rank is not None:
            cmd += ["--node-rank", str(p.node_rank)]
    if p.max_restarts:
        cmd += ["--max-restarts", str(p.max_restarts)]
    return [*cmd, "-m", "gpt2cli", "train", "--spec", str(spec_path)]


def worker_env(p: ParallelSpec, spec_path: Path, base: Mapping[str, str], run_locked: bool = False) -> dict[str, str]:
    """The workers' environment: ``base`` plus our defaults (a value the user set wins), and
    whether this launcher holds the run folder's lock for them."""
    env = dict(base)
    env.pop(RUN_LOCKED_ENV, None)
    if run_locked:
        env[RUN_LOCKED_ENV] = str(spec_path.parent.resolve())
    # torchrun would set 1 thread per worker with a warning; say it ourselves, sized to the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.procs_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if p.strategy == "fsdp":
        # FSDP returns host blocks of 16 MB and more to the OS (FSDPStrategy), so the CPU pays a
        # page fault per 4 KiB each time it allocates one again; torch's allocator advises them
        # for 2 MiB pages instead: +25% per step at nano on 2 CPU processes. torch reads this
        # once, at its first allocation, so it must be in the environment the worker starts with.
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    env[LAUNCH_DIR_ENV] = str(spec_path.parent)
    return env


def launch(p: ParallelSpec, spec_path: Path, debug: bool = False, run_locked: bool = False) -> tuple[int, int | None]:
    """Run the workers under torchrun (``run_locked``: this process holds the run folder's lock).
    Returns torchrun's exit code (128 + N when a signal N ended it) and the signal (SIGINT or
    SIGTERM) this launcher received and forwarded to it, if any.

    A first SIGINT/SIGTERM is forwarded to torchrun, once: torchrun runs in a session of its own,
    so a Ctrl-C at the terminal reaches it only through this process. A second one stops the job
    at once (torchrun and every worker killed), as a second Ctrl-C stops a single process. Either
    way this returns only when every worker has exited: on Linux this process is their subreaper,
    so workers that outlive torchrun come back to it to be waited for, and the run folder's lock
    is never released while one of them still writes."""
    cmd = torchrun_command(p, spec_path)
    if debug:
        cmd.append("--debug")
    env = worker_env(p, spec_path, os.environ, run_locked)
    take_worker_error(spec_path.parent, remove=True)  # a previous launch's
    (spec_path.parent / STOP_SIGNAL_FILE).unlink(missing_ok=True)
    received: list[int] = []
    forwarded = [False]  # the first signal reached torchrun (from the handler or after Popen)
    proc: subprocess.Popen | None = None
    _set_subreaper(True)
    ours_before = set(_children(os.getpid()))  # not to be waited for (a caller's other children)

    def pass_on() -> None:
        """The first signal to torchrun, once; a second one kills the job."""
        if proc is None or not received:
            return
        if not forwarded[0]:
            forwarded[0] = True
            _note_stop_signal(spec_path.parent, received[0])
            proc.send_signal(received[0])
        if len(received) > 1:
            _kill_job(proc.pid)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        pass_on()

    # The handlers go in before torchrun starts: a signal arriving while it starts is still
    # forwarded, and torchrun does not inherit an ignored SIGINT (as a background job's is)
    # that would make it deaf to the forwarded one.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        pass_on()  # what arrived before proc existed
        code = proc.wait()
        _wait_for_orphans(received, ignore=ours_before)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _set_subreaper(False)
        (spec_path.parent / STOP_SIGNAL_FILE).unlink(missing_ok=True)
    return (128 - code if code < 0 else code), (received[0] if received else None)


def _note_stop_signal(folder: Path, signum: int) -> None:
    try:
        (folder / STOP_SIGNAL_FILE).write_text(signal.Signals(signum).name, encoding="utf-8")
    except OSError:
        pass


def _set_subreaper(on: bool) -> None:
    """Linux: while on, processes orphaned below this one (workers whose torchrun died) are
    re-parented to it rather than to init, so that :func:`_wait_for_orphans` can wait for them.
    Off again once the launch is over (a caller that lives on, a sweep, collects no strays)."""
    if sys.platform == "linux":
        _prctl(36, 1 if on else 0)  # PR_SET_CHILD_SUBREAPER


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc; empty elsewhere or when it is gone)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return found


def _signal_tree(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` and to the process group it leads, if it leads one (torchrun's workers
    each lead a session of their own, with any processes they started)."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, sig)
        except OSError:
            pass


def _kill_job(torchrun_pid: int) -> None:
    """Stop the job at once: SIGKILL to torchrun's workers and to torchrun (Linux finds the
    workers through /proc; elsewhere torchrun's process group only)."""
    for worker in _children(torchrun_pid):
        _signal_tree(worker, signal.SIGKILL)
    _signal_tree(torchrun_pid, signal.SIGKILL)


def _wait_for_orphans(received: list[int], ignore: set[int]) -> None:
    """Wait for the workers that outlived torchrun (now this process's children, see
    :func:`_set_subreaper`; ``ignore``: children it had before). A signal meanwhile is passed
    on to them: SIGTERM first (they checkpoint and stop), SIGKILL after."""
    import time

    handled = len(received)
    while True:
        orphans = [pid for pid in _children(os.getpid()) if pid not in ignore]  # re-read: late arrivals
        if not orphans:
            return
        if len(received) > handled:
            sig = signal.SIGKILL if len(received) > 1 else signal.SIGTERM
            handled = len(received)
            for pid in orphans:
                _signal_tree(pid, sig)
        for pid in orphans:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)


def _die_with_parent() -> None:
    """In the torchrun child (Linux): SIGTERM when this launcher dies, even by SIGKILL, so that
    torchrun stops its workers (they checkpoint and exit) instead of running on unattended."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prctl(option: int, value: int) -> None:
    """Linux prctl(2); nothing where libc has none."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):
        pass


def report_to_launcher(rank: int, exit_code: int, line: str) -> bool:
    """In a worker started by :func:`launch`: leave its error line for the launcher. False when
    not started by it (the worker then prints the error itself)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    path = Path(folder) / f"{WORKER_ERROR_PREFIX}{rank}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"rank": rank, "exit_code": exit_code, "error": line}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def take_worker_error(run_dir: Path, remove: bool = False) -> dict | None:
    """The error of the lowest rank that reported one (see :func:`report_to_launcher`). The reports
    stay until the next launch removes them (``remove``): with several nodes sharing the folder,
    every node's launcher reads them."""
    found = []
    for path in Path(run_dir).glob(f"{WORKER_ERROR_PREFIX}*.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        if remove:
            try:
                path.unlink()
            except OSError:
                pass
    found = [r for r in found if isinstance(r, dict) and isinstance(r.get("error"), str)]
    return min(found, key=lambda r: r.get("rank", 0)) if found else None
