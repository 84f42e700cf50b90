"""Rendering for the CLI: rich tables for people, stable JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

# Piped output is read by people too (logs, CI): give tables room instead of rich's 80.
console = Console(width=None if sys.stdout.isatty() else 132)


def print_json(data: Any) -> None:
    """Print ``data`` (models, lists of models, plain values) as indented JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    sys.stdout.write(json.dumps(plain(data), indent=2, sort_keys=False) + "\n")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table; numbers are right-aligned."""
    out = Table(title=title)
    rows = [list(r) for r in rows]
    for index, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[index], int | float) for r in rows)
        if numeric:  # numbers are never cut or wrapped; text wraps if space runs out
            out.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        else:
            out.add_column(name, no_wrap=index == 0, overflow="fold")
    for row in rows:
        out.add_row(*(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row))
    console.print(out)
