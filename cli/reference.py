"""The CLI reference, rendered from the commands' own --help: `python -m cli.reference > docs/cli.md`.

Click's plain help formatter at a fixed width (no rich markup, no colour, no terminal size), so the
text is the same on every machine; tests/unit/test_docs.py checks that docs/cli.md matches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer.main

WIDTH = 100
HEADER = """\
# CLI reference

Generated from the commands' `--help` by `python -m cli.reference > docs/cli.md`; do not edit by hand
(`tests/unit/test_docs.py` checks that this file matches). Exit codes: 0 ok, 1 a failed unit, 2 bad
input, 3 not found, 4 busy (the atlas is held), 5 another schema version.
"""


def _walk(command: Any, name: str, parent: Any = None) -> Iterator[tuple[str, str]]:
    """(command path, plain help text) for a command and, depth first, its subcommands in the
    order the group lists them."""
    command.rich_markup_mode = None  # Typer's plain path: click's formatter, no rich panels or colour
    ctx = command.context_class(command, info_name=name, parent=parent, terminal_width=WIDTH,
                                max_content_width=WIDTH, color=False)
    yield ctx.command_path, command.get_help(ctx).rstrip()
    for sub in command.list_commands(ctx) if hasattr(command, "list_commands") else ():
        yield from _walk(command.get_command(ctx, sub), sub, ctx)


def commands(app: typer.Typer | None = None) -> list[str]:
    """Every command path, `atlas` first: `atlas build`, ..., `atlas lens train`."""
    return [path for path, _ in _walk(typer.main.get_command(app or _app()), "atlas")]


def render(app: typer.Typer | None = None) -> str:
    """The whole reference as Markdown: a table of contents, then each command's --help."""
    pages = list(_walk(typer.main.get_command(app or _app()), "atlas"))
    lines = [HEADER]
    for path, _ in pages[1:]:
        lines.append(f"- [`{path}`](#{path.replace(' ', '-')})")
    for path, text in pages:
        lines += ["", f"## {path}", "", "```text", text, "```"]
    return "\n".join(lines) + "\n"


def _app() -> typer.Typer:
    from cli.main import app

    return app


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
