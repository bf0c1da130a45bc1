"""`gpt2 train`: Train a model (single device, DDP or FSDP), with evaluation, checkpoints and exact resume."""

from __future__ import annotations

import typer

from gpt2cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("train", help="Train a model (single device, DDP or FSDP), with evaluation, checkpoints and exact resume.", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        train
    )


def train(ctx: typer.Context) -> None:
    raise UserError("`gpt2 train` is not available yet", "it lands with issue #4")
