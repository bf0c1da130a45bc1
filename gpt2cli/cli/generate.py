"""`gpt2 generate`: Sample text from a checkpoint, a run folder or a GPT-2 model (KV-cached)."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("generate", help="Sample text from a checkpoint, a run folder or a GPT-2 model (KV-cached).", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        generate
    )


def generate(ctx: typer.Context) -> None:
    raise UserError("`gpt2 generate` is not available yet", "it lands with issue #6")
