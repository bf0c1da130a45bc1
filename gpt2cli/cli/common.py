"""Pieces every command shares: option aliases, spec building, output helpers.

Only the cli package prints for humans; library code returns values or raises UserError.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# Results go to stdout; progress, timing and messages to stderr so that stdout stays pipeable.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

PRECEDENCE_HELP = "Settings precedence: defaults < --config FILE < flags < --set section.field=value."
# generate, eval, data and compare: specs without sections.
FLAT_PRECEDENCE_HELP = "Settings precedence: defaults < --config FILE < flags < --set field=value."

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="TOML, YAML or JSON spec file. Settings precedence: defaults < "
                 "--config FILE < flags < --set.", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any spec field: section.field=value (repeatable); wins over flags."),
]


def flat_set_opt(command: str) -> Any:
    """--set of a command whose spec has no sections: field=value, or COMMAND.field=value
    (build_spec's set_prefix drops the redundant prefix)."""
    return Annotated[
        list[str] | None,
        typer.Option("--set", help=f"Override any spec field: field=value, or {command}.field=value "
                     "(repeatable); wins over flags."),
    ]


def field_help(spec_cls: type[BaseModel], field: str) -> str:
    """The spec field's description: one source for --help and docs."""
    info = spec_cls.model_fields[field]
    return info.description or ""


def print_json(obj: Any) -> None:
    """Strict JSON on stdout: a NaN or infinite number is null (JSON has neither)."""
    from gpt2cli.metrics import finite_or_null

    sys.stdout.write(json.dumps(finite_or_null(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def plural(n: int, word: str) -> str:
    """3 -> '3 tokens', 1 -> '1 token' (thousands separated)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def si(value: float, digits: int = 1) -> str:
    """1234567 -> '1.2M': rates and counts for progress lines."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f}{unit}"
    return f"{value:.0f}"


def print_wide(table: Table, console: Console | None = None) -> None:
    """On a terminal, rich fits the table to it; piped, the table is as wide as it needs, so
    that cells never wrap or get cut in files and docs. ``console``: stdout's (``out``) unless given."""
    console = console or out
    if console.is_terminal:
        console.print(table)
    else:
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        for heading in (table.title, table.caption):  # rich wraps a title to the table's width
            if heading:
                heading_width = Text.from_markup(heading).cell_len if isinstance(heading, str) else heading.cell_len
                table.min_width = max(table.min_width or 0, heading_width)
                width = max(width, heading_width)
        buf = io.StringIO()
        Console(file=buf, width=max(console.width, width), highlight=False, color_system=None).print(table)
        console.file.write("".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines()))
        console.file.flush()
