"""Command-line checks shared by the benchmark scripts: bad input ends in one line and exit 2.

A benchmark run can cost minutes (or a lent GPU's budget), so a typo in a name must stop it at
once, with what is wrong and what to do, rather than be ignored or end in a traceback. The
scripts run as `python benchmarks/NAME.py`, so this folder is on their import path."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn


def refuse(message: str) -> NoReturn:
    """Print ``<script>: error: <message>`` on stderr and exit with status 2 (bad input)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but its errors are one line (argparse prints the usage block above them)."""

    def error(self, message: str) -> NoReturn:
        refuse(f"{message} (see --help)")


def parse_names(option: str, value: str, valid: Iterable[str]) -> list[str]:
    """The comma list ``value`` of ``option``, in order; refuses any name not in ``valid``."""
    valid = list(valid)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown:
        refuse(f"unknown name{'s' if len(unknown) > 1 else ''} in {option}: {', '.join(unknown)}; "
               f"valid: {', '.join(valid)}")
    return names


def parse_positive_ints(option: str, value: str) -> list[int]:
    """The comma list of whole numbers >= 1 in ``value`` (e.g. --gen-batches 1,8)."""
    numbers = []
    for item in value.split(","):
        try:
            number = int(item)
        except ValueError:
            refuse(f"{option}: {item.strip()!r} is not a whole number; give a comma list such as 1,8")
        if number < 1:
            refuse(f"{option}: {number} must be 1 or more")
        numbers.append(number)
    return numbers
