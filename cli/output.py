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


def emit(table: pa.Table, fmt: Format = Format.table, title: str | None = None) -> None:
    if fmt is Format.json:
        typer.echo(json.dumps(table.to_pylist(), default=str))
    elif fmt is Format.csv:
        import pyarrow.csv as pacsv

        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        typer.echo(buffer.getvalue().decode(), nl=False)
    elif sys.stdout.isatty():
        from rich.table import Table

        view = Table(title=title)
        for name in table.column_names:
            view.add_column(name)
        for row in table.to_pylist():
            view.add_row(*(_cell(v) for v in row.values()))
        Console().print(view)
    else:  # piped: plain tab-separated text with a header
        typer.echo("\t".join(table.column_names))
        for row in table.to_pylist():
            typer.echo("\t".join(_cell(v) for v in row.values()))


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str, indent=1))
