"""`gpt2 eval`: Score checkpoints: loss, perplexity and bits per byte on the same token windows."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("eval", help="Score checkpoints: loss, perplexity and bits per byte on the same token windows.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        evaluate
    )


def evaluate(ctx: typer.Context) -> None:
    raise UserError("`gpt2 eval` is not available yet", "it lands with issue #6")
