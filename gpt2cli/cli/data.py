"""`gpt2 data`: Turn a text corpus (files, folders, JSONL, parquet, HF datasets) into GPT-2 token files."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("data", help="Turn a text corpus (files, folders, JSONL, parquet, HF datasets) into GPT-2 token files.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        data
    )


def data(ctx: typer.Context) -> None:
    raise UserError("`gpt2 data` is not available yet", "it lands with issue #3")
