"""Data to stdout (table, JSON or CSV); messages and progress to stderr."""

from __future__ import annotations

import enum
import io
import json
import sys
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:  # data arrives as Arrow; this module loads it only to write CSV
    import pyarrow as pa

stderr = Console(stderr=True)


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def emit(table: pa.Table | list[dict[str, Any]], fmt: Format = Format.table, title: str | None = None) -> None:
    """Print a table, or rows as dicts (printed the same; Arrow built from Python values would import pandas)."""
    if fmt is Format.csv:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        arrow = pa.Table.from_pylist(table) if isinstance(table, list) else table
        buffer = io.BytesIO()
        pacsv.write_csv(arrow, buffer)
        typer.echo(buffer.getvalue().decode(), nl=False)
        return
    rows = table if isinstance(table, list) else table.to_pylist()
    names = (list(rows[0]) if rows else []) if isinstance(table, list) else table.column_names
    if fmt is Format.json:
        typer.echo(json.dumps(rows, default=str))
    elif sys.stdout.isatty():
        from rich.table import Table

        view = Table(title=title)
        for name in names:
            view.add_column(name)
        for row in rows:
            view.add_row(*(_cell(v) for v in row.values()))
        Console().print(view)
    else:  # piped: plain tab-separated text with a header
        typer.echo("\t".join(names))
        for row in rows:
            typer.echo("\t".join(_cell(v) for v in row.values()))


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str, indent=1))
