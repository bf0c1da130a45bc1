"""`gpt2 export`: Export a checkpoint to a Hugging Face GPT-2 folder or to safetensors.

``--format hf`` writes ``config.json`` + ``model.safetensors`` that
``transformers.GPT2LMHeadModel.from_pretrained`` loads; only GPT-2's own architecture (learned
positions, multi-head attention, biases) can be expressed there, so other variants are refused
before anything is written. ``--format safetensors`` writes one file with the weights and our
ModelSpec as JSON in its header, for every variant; `gpt2 generate` and `gpt2 eval` read it.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

HELP = "Export a checkpoint to a Hugging Face GPT-2 folder or to safetensors."


class ExportFormat(str, Enum):
    hf = "hf"
    safetensors = "safetensors"


def register(app: typer.Typer) -> None:
    app.command("export", help=HELP, no_args_is_help=True)(export)


def export(
    ckpt: Annotated[
        str,
        typer.Argument(
            metavar="CKPT",
            help="Checkpoint file, run folder (its best.pt), Hugging Face GPT-2 folder or hub name, "
            "or a safetensors export.",
            show_default=False,
        ),
    ],
    out_path: Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="hf: the folder to write; safetensors: the .safetensors file (a folder gets "
            "model.safetensors inside).",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="hf: a transformers GPT-2 folder (learned positions + MHA only); "
                     "safetensors: weights + our spec, any variant."),
    ] = ExportFormat.hf,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
) -> None:
    """Export CKPT to OUT."""
    import sys

    from gpt2cli.loading import export_model

    target, loaded = export_model(ckpt, out_path, fmt.value, overwrite=overwrite)
    sys.stdout.write(f"{target}\n")
    sys.stderr.write(f"exported {loaded.source} as {fmt.value} -> {target}\n")
