"""`python -m gpt2cli` (torchrun re-runs the tool this way)."""

import os
import signal

if __name__ == "__main__" and "RANK" in os.environ:
    # A torchrun worker: a Ctrl-C that reaches it while it still imports torch ends it quietly
    # (the launcher says once what happened); gpt2cli.train takes signals over once it runs.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

from gpt2cli.console import main  # noqa: E402  (after the handler: the CLI's import takes seconds)

if __name__ == "__main__":
    main()
