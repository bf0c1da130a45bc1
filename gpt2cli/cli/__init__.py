"""The `gpt2` command: a root that wires one module per sub-command, and the single place where
errors become exit codes."""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from typing import Annotated

import typer

from gpt2cli import __version__
from gpt2cli.cli import compare, data, evaluate, export, generate, info, train
from gpt2cli.errors import StoppedBySignal, UserError
from gpt2cli.fsutil import disk_full_error


def _click_exception_modules() -> list:
    """Typer >= 0.26 vendors click as ``typer._click``; older Typer uses click itself."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    return modules


def _classes(attr: str) -> tuple[type[BaseException], ...]:
    return tuple(getattr(m, attr) for m in _click_exception_modules() if hasattr(m, attr))


_NO_ARGS_HELP = _classes("NoArgsIsHelpError")
_USAGE_ERROR = _classes("UsageError")
_CLICK_EXCEPTION = _classes("ClickException")
_ABORT = _classes("Abort")

app = typer.Typer(
    name="gpt2",
    help="Prepare data for, train, evaluate, sample from and compare GPT-2-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpt2 {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """Prepare data for, train, evaluate, sample from and compare GPT-2-family language models."""


for module in (data, train, evaluate, generate, compare, info, export):
    module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `gpt2` console script. `--debug` is accepted anywhere on the line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        result = app(args=args, standalone_mode=False, prog_name="gpt2")
    except (SystemExit, BrokenPipeError) as exc:
        if _ended_by_closed_output(exc):
            _exit_for_closed_output()
        raise
    except StoppedBySignal as exc:
        sys.stderr.write(exc.message + "\n")
        sys.exit(exc.exit_code)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(exc.render() + "\n")
        sys.exit(exc.exit_code)
    except _NO_ARGS_HELP as exc:
        # Help was printed. `gpt2` alone asked for nothing else (0); a command without its
        # arguments, e.g. `gpt2 eval runs/*/best.pt` on a glob that matched nothing, did not do
        # its job (2, as Click's own usage errors).
        sys.exit(0 if exc.ctx is None or exc.ctx.parent is None else 2)
    except _USAGE_ERROR as exc:
        if debug:
            traceback.print_exc()
        where = exc.ctx.command_path if exc.ctx else "gpt2"
        message = exc.format_message().replace("\n", " ").rstrip(".")
        sys.stderr.write(f"Error: {message} (see '{where} --help')\n")
        sys.exit(2)
    except _CLICK_EXCEPTION as exc:
        sys.stderr.write(f"Error: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except (*_ABORT, KeyboardInterrupt):
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except Exception as exc:
        # A full disk, wherever it struck (torch.save wraps it in a RuntimeError, a write without
        # a path has no filename): one line, and the user frees space. Other errors on a path the
        # user named: one line too. Anything else is a bug and keeps its traceback.
        full = disk_full_error(exc)
        if debug or (full is None and not (isinstance(exc, OSError) and exc.filename is not None)):
            raise
        sys.stderr.write(_path_error(full or exc) + "\n")
        sys.exit(2 if (full or exc).errno in _USER_FIXABLE else 1)
    if result == 130:  # Typer's answer to a Ctrl-C (commands that stop on a signal raise StoppedBySignal)
        sys.stderr.write("Aborted.\n")
    sys.exit(result if isinstance(result, int) else 0)


# What a process ended by SIGPIPE reports (128 + 13): `gpt2 generate ... | head` stops sampling at
# the next token and ends the way `seq ... | head` does, with no message.
EXIT_OUTPUT_CLOSED = 128 + 13


def _ended_by_closed_output(exc: BaseException) -> bool:
    """True when this exit comes from writing to a pipe whose reader is gone. Click and rich turn
    that BrokenPipeError into a quiet exit 1; the error stays in the exit's context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BrokenPipeError):
            return True
        seen = seen.__context__
    return False


def _exit_for_closed_output() -> None:
    # Point stdout at /dev/null so the interpreter's final flush of buffered text cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno())
    sys.exit(EXIT_OUTPUT_CLOSED)


# A path that cannot be written or read as asked: the user can change the path or its rights.
_USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                 errno.ENOSPC, errno.EDQUOT}


def _path_error(exc: OSError) -> str:
    """One line for a file-system error on a path (read-only folder, a file where a folder is
    needed, no space left, ...), instead of a traceback."""
    what = exc.strerror or type(exc).__name__
    hint = ("free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the path and its permissions")
    where = f": {str(exc.filename)!r}" if exc.filename is not None else ""
    return f"Error: {what}{where} ({hint})"
