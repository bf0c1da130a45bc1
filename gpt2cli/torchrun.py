"""torchrun as `gpt2 train` runs it: ``python -m gpt2cli.torchrun ARGS`` is
``python -m torch.distributed.run ARGS``, except when it is stopped by a signal.

torchrun turns SIGINT/SIGTERM into a ``SignalException``: it stops its workers (they checkpoint
and exit, see gpt2cli.train) and then lets the exception escape, so every interrupted run ended
with its traceback on stderr, and a Ctrl-C during its start-up with a ``KeyboardInterrupt`` one.
Here either ends it with the shell's code for the signal (128 + its number) and no traceback;
the launcher (gpt2cli.parallel.launch) reads the run's status and says what happened, once.
It lives outside gpt2cli.parallel, whose import loads torch: a Ctrl-C during that import would
escape before :func:`main` could catch it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

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
    down workers", "Sending process N closing signal SIGTERM"). The launcher already says, once,
    that the run was stopped and where its checkpoint is; these lines only repeat it."""

    NOTICES = ("death signal, shutting down workers", "closing signal")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


# Where torch logs those notices (agent/server/api.py, multiprocessing/api.py in torch 2.4-2.13).
_SHUTDOWN_NOTICE_LOGGERS = ("torch.distributed.elastic.agent.server.api",
                            "torch.distributed.elastic.multiprocessing.api")


def main() -> None:
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    try:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing import api as multiprocessing_api
        from torch.distributed.run import main as torchrun_main

        _stop_workers_with_sigterm(multiprocessing_api, SignalException)
        for name in _SHUTDOWN_NOTICE_LOGGERS:
            logging.getLogger(name).addFilter(_DropShutdownNotices())
        try:
            torchrun_main()
        except SignalException as exc:
            sys.exit(128 + int(exc.sigval))
    except KeyboardInterrupt:  # before torchrun installed its handlers (while importing torch)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
