"""The `gpt2` console script's entry point: :func:`gpt2cli.cli.main`, reached through an import
that takes a second or more (Typer, rich, pydantic). A Ctrl-C during that import would end in a
KeyboardInterrupt traceback from whichever module was loading; here it ends as a Ctrl-C anywhere
else outside a training loop does: ``Aborted.`` and exit 130. This module imports nothing else,
so the window it leaves is the interpreter's own start-up."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from gpt2cli.cli import main as run_command
    except KeyboardInterrupt:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    run_command()
