"""`gpt2 compare`: Compare runs side by side: a table of metrics and a plot of loss curves."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("compare", help="Compare runs side by side: a table of metrics and a plot of loss curves.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        compare
    )


def compare(ctx: typer.Context) -> None:
    raise UserError("`gpt2 compare` is not available yet", "it lands with issue #7")
