"""The one user-error type.

Library code raises :class:`UserError` for anything the user can fix (a bad flag, a missing file,
a damaged checkpoint). The CLI renders it once as ``Error: <what> (<hint>)`` on stderr and exits
with ``exit_code`` (2 by default). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and the hint says how."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def render(self) -> str:
        """One line: ``Error: <message> (<hint>)``."""
        # One sentence-ending period goes (the hint follows in brackets); an ellipsis saying that
        # a list goes on stays.
        text = self.message if self.message.endswith("...") else self.message.removesuffix(".")
        if self.hint:
            text += f" ({self.hint})"
        return f"Error: {text}"

    def __str__(self) -> str:  # so a stray print or log shows the full line
        return self.render()[len("Error: "):]


class NonFiniteLossError(UserError):
    """Training met a NaN/inf loss or gradient and stopped before the optimizer step."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, exit_code=3)


class StoppedBySignal(Exception):
    """A command stopped by SIGINT/SIGTERM that says so itself: the CLI writes ``message`` as it is
    (not an ``Error:`` line) and exits with ``exit_code`` (the shell's 128 + signal number)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# Exit codes the CLI documents (docs/training.md).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGINT/SIGTERM after writing a checkpoint; resume with --resume auto
