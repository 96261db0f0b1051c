"""The `atlas` Typer app and the options its commands share (cli/main.py and the command modules
register commands on it)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from atlas.errors import AtlasError, BadInput
from cli.output import Format, stderr

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="head-atlas: what every attention head does, across models.")

DEFAULT_DB = "atlas.duckdb"
DbOption = Annotated[Path, typer.Option("--db", envvar="ATLAS_DB", help="The atlas DuckDB file.")]
ServerOption = Annotated[str | None, typer.Option("--server", envvar="ATLAS_SERVER",
                                                  help="Read from an `atlas serve` URL instead of --db.")]
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="table, json or csv.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Same as --format json.")]


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn AtlasError into a clear message on stderr and an exit code by class of error."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AtlasError as exc:
            stderr.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                stderr.print(f"  [dim]hint:[/] {exc.hint}", highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def output_format(fmt: Format, as_json: bool) -> Format:
    return Format.json if as_json else fmt


def key_values(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to options; a VALUE that parses as JSON (10, 0.5, [0.01, 0.05]) is taken as such.
    The names and values are checked with every other option, by workers.options.validate."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--option {pair!r} is not KEY=VALUE", "write it like --option n_random=10")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out
