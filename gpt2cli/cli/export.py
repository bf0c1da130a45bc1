"""`gpt2 export`: Export a checkpoint to a Hugging Face GPT-2 folder or to safetensors."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("export", help="Export a checkpoint to a Hugging Face GPT-2 folder or to safetensors.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        export
    )


def export(ctx: typer.Context) -> None:
    raise UserError("`gpt2 export` is not available yet", "it lands with issue #6")
