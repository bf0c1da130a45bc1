"""`gpt2 info`: Model size, FLOPs per token, KV-cache bytes and memory estimates for a spec."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("info", help="Model size, FLOPs per token, KV-cache bytes and memory estimates for a spec.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        info
    )


def info(ctx: typer.Context) -> None:
    raise UserError("`gpt2 info` is not available yet", "it lands with issue #2")
