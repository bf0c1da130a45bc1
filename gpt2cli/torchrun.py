"""torchrun as `gpt2 train` runs it: ``python -m gpt2cli.torchrun ARGS`` is
``python -m torch.distributed.run ARGS``, except when it is stopped by a signal.

torchrun turns SIGINT/SIGTERM into a ``SignalException``: it stops its workers (they checkpoint
and exit, see gpt2cli.train) and then lets the exception escape, so every interrupted run ended
with its traceback on stderr, and a Ctrl-C during its start-up with a ``KeyboardInterrupt`` one.
Here either ends it with the shell's code for the signal (128 + its number) and no traceback;
the launcher (gpt2cli.parallel.launch) reads the run's status and says what happened, once.
It lives outside gpt2cli.parallel, whose import loads torch: a Ctrl-C during that import would
escape before :func:`main` could catch it.

A one-node run (``--standalone``) also keeps its stores on loopback. torch's TCPStore listens on
every interface whatever host it is given, and it has no authentication: anyone who could reach
the machine could write into a run's rendezvous. Here the agent's stores, and the workers' own
where torch gives them none, listen on 127.0.0.1 only (:func:`tcp_store`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any

# The agent's pid, for its workers: a worker that starts after the agent died (killed while the
# worker still imported torch) has been re-parented already, so its own getppid() cannot tell.
AGENT_PID_ENV = "GPT2CLI_TORCHRUN_PID"


def _stop_workers_with_sigterm(api: object, signal_exception: type[Exception]) -> None:
    """torchrun stops its workers with the signal it got. A SIGINT reaching a worker that is still
    starting Python (or importing torch) prints a traceback or a "Fatal Python error"; SIGTERM
    ends it silently, and a running worker treats both alike (checkpoint, then stop). So a SIGINT
    is passed on as SIGTERM. This replaces torch's private handler where it has the known name;
    otherwise torchrun keeps its own."""
    if not callable(getattr(api, "_terminate_process_handler", None)):
        return

    def terminate(signum: int, frame: object) -> None:
        sent = signal.SIGTERM if signum == signal.SIGINT else signal.Signals(signum)
        raise signal_exception(f"Process {os.getpid()} got signal: {signum}", sent)

    api._terminate_process_handler = terminate


class _DropShutdownNotices(logging.Filter):
    """torchrun logs a warning per worker when it stops them ("Received 15 death signal, shutting
    down workers", "Sending process N closing signal SIGTERM"), and an error when one fails
    ("failed (exitcode: 1) local_rank: ..."). The launcher already says, once, that the run was
    stopped and where its checkpoint is, or which worker failed; these lines only repeat it."""

    NOTICES = ("death signal, shutting down workers", "closing signal")
    # A worker's failure: the launcher names it when it ends the job. With restarts left it does
    # not end the job, and torchrun's line is the only word of it: kept then.
    FAILURE = "failed (exitcode"

    def __init__(self, restarts: bool = False) -> None:
        super().__init__()
        self.notices = self.NOTICES if restarts else (*self.NOTICES, self.FAILURE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.notices)


# Where torch logs those notices (agent/server/api.py, multiprocessing/api.py in torch 2.4-2.13).
_SHUTDOWN_NOTICE_LOGGERS = ("torch.distributed.elastic.agent.server.api",
                            "torch.distributed.elastic.multiprocessing.api")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def tcp_store(host: str, port: int, *, is_master: bool = False, **kwargs: Any) -> Any:
    """``torch.distributed.TCPStore(host, port, is_master=..., **kwargs)``, except that a server
    for a loopback host listens on loopback only (torch's binds every interface): it gets a socket
    already bound there (``master_listen_fd``). Port 0 picks a free port, as torch's does."""
    import torch.distributed as dist

    if not is_master or host not in LOOPBACK_HOSTS or kwargs.get("master_listen_fd") is not None:
        return dist.TCPStore(host, port, is_master=is_master, **kwargs)
    family, address = (socket.AF_INET6, "::1") if host == "::1" else (socket.AF_INET, "127.0.0.1")
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        # What torch raises for a port in use: its callers (the c10d rendezvous) handle it.
        raise RuntimeError(f"the store could not listen on {address}:{port}: {exc}") from exc
    port = listener.getsockname()[1]
    fd = listener.detach()
    try:
        try:
            return dist.TCPStore(host, port, is_master=True, master_listen_fd=fd, **kwargs)
        except NotImplementedError:
            # torch's libuv store (the default since 2.4) took no listening socket before about
            # 2.8 ("does not support initialization with an listen fd"); its legacy store does.
            return dist.TCPStore(host, port, is_master=True, master_listen_fd=fd, **{**kwargs, "use_libuv": False})
    except BaseException:
        os.close(fd)
        raise


def _keep_agent_stores_on_loopback() -> None:
    """The two stores a standalone torchrun agent serves (the c10d rendezvous backend's and the one
    it shares with its workers), made with :func:`tcp_store`. Each is replaced only where torch
    has the known name (2.4-2.13); otherwise torch's own stays."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

    torch_store = getattr(c10d_rendezvous_backend, "TCPStore", None)
    if torch_store is not None:
        def rendezvous_store(host_name: str, port: int, *args: Any, **kwargs: Any) -> Any:
            if args:  # a call this wrapper does not know: torch's store as it was
                return torch_store(host_name, port, *args, **kwargs)
            return tcp_store(host_name, port, **kwargs)

        c10d_rendezvous_backend.TCPStore = rendezvous_store
    handler = getattr(dynamic_rendezvous, "DynamicRendezvousHandler", None)
    if handler is not None and hasattr(handler, "_create_tcp_store_server"):
        def shared_store(self: Any, master_addr: str, master_port: int) -> Any:
            return tcp_store(master_addr, master_port, is_master=True, multi_tenant=True)

        handler._create_tcp_store_server = shared_store


# Where the agent leaves the line saying which worker failed (in the launch folder).
JOB_FAILURE_FILE = ".job-failure"


def describe_failure(failures: dict[int, Any]) -> str:
    """"worker rank 1 was killed by SIGKILL": how torchrun's failed workers ended. Once one
    fails, torchrun stops the others with SIGTERM, and they are recorded as failed too: those are
    named only when no worker ended another way. Workers that ended alike are named together
    (a peer that noticed the failure exits with code 1 as well; which came first is not known)."""
    def how(failure: Any) -> str:
        return (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                else f"exited with code {failure.exitcode}")

    causes = {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM} or dict(failures)
    by_how: dict[str, list[int]] = {}
    for rank in sorted(causes):
        by_how.setdefault(how(causes[rank]), []).append(rank)
    parts = []
    for text, ranks in by_how.items():
        many = len(ranks) > 1
        verb = ("were " if many else "was ") if text.startswith("killed") else ""
        parts.append(f"worker rank{'s' if many else ''} {', '.join(map(str, ranks))} {verb}{text}")
    return "; ".join(parts)


def _leave_failure_for_launcher(exc: Any) -> None:
    folder = os.environ.get("GPT2CLI_LAUNCH_DIR")  # gpt2cli.parallel.launch.LAUNCH_DIR_ENV
    if not folder:
        return
    try:
        with open(os.path.join(folder, JOB_FAILURE_FILE), "w", encoding="utf-8") as f:
            f.write(describe_failure(exc.failures))
    except (OSError, AttributeError, ValueError):
        pass


def main() -> None:
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    try:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing import api as multiprocessing_api
        from torch.distributed.run import main as torchrun_main

        _stop_workers_with_sigterm(multiprocessing_api, SignalException)
        if "--standalone" in sys.argv[1:]:
            _keep_agent_stores_on_loopback()
        restarts = "--max-restarts" in sys.argv[1:]  # gpt2cli.parallel.launch passes it only when above 0
        for name in _SHUTDOWN_NOTICE_LOGGERS:
            logging.getLogger(name).addFilter(_DropShutdownNotices(restarts))
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        try:
            torchrun_main()
        except SignalException as exc:
            sys.exit(128 + int(exc.sigval))
        except ChildFailedError as exc:
            if "--debug" in sys.argv:
                raise
            # torchrun's traceback and "Root Cause" block, replaced by one line for the launcher.
            _leave_failure_for_launcher(exc)
            sys.exit(1)
    except KeyboardInterrupt:  # before torchrun installed its handlers (while importing torch)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
