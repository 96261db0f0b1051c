"""Family options declared as data, and the one validator every door (CLI flags, -o, sweep files,
the server's build requests) goes through before anything is planned or written.

A family lists its `Option`s; `validate(families, options)` refuses an option no family in the
build declares (a typo would otherwise change nothing, silently), a value of the wrong type and a
value out of range, with a message that names the option, what was wrong and what to pass.
`resolve(declared, options)` gives a family's options with defaults filled in, typed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from atlas.errors import BadInput

SEED_MAX = 2**31 - 1  # every RNG the families use (torch, numpy, random) takes it


@dataclass(frozen=True)
class Option:
    """One option: its name, kind, default, range or choices, and a line of help."""

    name: str
    kind: str  # "int", "float", "str", "bool", "floats" (a list of floats), "text" (str or list of str)
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # None means "not given" (e.g. the embedded corpus)

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = "" if self.min is None else f">= {self.min:g}"
        high = "" if self.max is None else f"<= {self.max:g}"
        return " and ".join(x for x in (low, high) if x) or "any value"

    def check(self, value: Any) -> Any:
        """The value, typed; BadInput naming the option when it is of the wrong type or out of range."""
        if value is None:
            if self.nullable:
                return None
            return self.default
        checked = _TYPES[self.kind](self, value)
        numbers = checked if self.kind == "floats" else [checked] if self.kind in ("int", "float") else []
        for item in numbers:
            if (self.min is not None and item < self.min) or (self.max is not None and item > self.max):
                raise self.bad(value, f"out of range: must be {self.describe_range()}")
        if self.choices and checked not in self.choices:
            raise self.bad(value, f"not {self.describe_range()}")
        return checked

    def bad(self, value: Any, why: str) -> BadInput:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return BadInput(f"option '{self.name}' = {shown} is {why}",
                        f"{self.name}: {self.help} ({self.kind}, {self.describe_range()}, default {self.default!r})")


def _int(option: Option, value: Any) -> int:
    if isinstance(value, bool):
        raise option.bad(value, "not an integer")
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise option.bad(value, "not an integer") from None
    if not isinstance(value, int):
        raise option.bad(value, "not an integer")
    return value


def _float(option: Option, value: Any) -> float:
    if isinstance(value, bool):
        raise option.bad(value, "not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise option.bad(value, "not a number") from None
    if not math.isfinite(number):
        raise option.bad(value, "not a finite number")
    return number


def _str(option: Option, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise option.bad(value, "not a non-empty string")
    return value


def _bool(option: Option, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise option.bad(value, "not true or false")


def _floats(option: Option, value: Any) -> list[float]:
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise option.bad(value, "an empty list")
    return [_float(option, item) for item in items]


def _text(option: Option, value: Any) -> str | list[str]:
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise option.bad(value, "not a list of non-empty strings")
        return list(value)
    return _str(option, value)


_TYPES: dict[str, Callable[[Option, Any], Any]] = {
    "int": _int, "float": _float, "str": _str, "bool": _bool, "floats": _floats, "text": _text}


# Options more than one family reads: declared once here, listed by each family that reads them.
SEED = Option("seed", "int", 0, "seed of the built-in probe sets and random controls", min=0, max=SEED_MAX)
CORPUS = Option("corpus", "str", None, "corpus file (text, JSONL, Parquet) or HF dataset; default the embedded "
                "one", nullable=True)
TEXT_FIELD = Option("text_field", "str", "text", "JSONL field or Parquet column with the text")
CONCEPTS = Option("concepts", "text", None, "comma-separated concepts or concept files; default all built-in",
                  nullable=True)


def declared_by(families: Iterable[Any]) -> dict[str, Option]:
    """Every option the families declare, by name; two declarations of one name must agree."""
    out: dict[str, Option] = {}
    for family in families:
        for option in getattr(family, "options", ()):  # a plugin family may declare none
            if option.name in out and out[option.name] != option:
                raise ValueError(f"option '{option.name}' is declared differently by two families")
            out[option.name] = option
    return out


BUILD_WIDE = {option.name: option for option in (SEED, CORPUS, TEXT_FIELD, CONCEPTS)}  # any build takes them


def validate(families: Sequence[Any], options: dict[str, Any], grid: Iterable[str] = ()) -> dict[str, Any]:
    """Check every given option against the declarations of the families in the build.

    Options named in `grid` may be lists (a sweep runs every value); each value is checked. The
    build-wide options (seed, corpus, text_field, concepts) are accepted even where no family reads
    them. Returns the options with values typed (defaults are filled in by `resolve`).
    """
    declared = {**BUILD_WIDE, **declared_by(families)}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        names = ", ".join(f"'{key}'" for key in unknown)
        known = ", ".join(sorted(declared))
        raise BadInput(f"no family in this build ({', '.join(f.name for f in families)}) reads the "
                       f"option{'s' * (len(unknown) > 1)} {names}",
                       f"options these families read: {known} (see docs/options.md)")
    out: dict[str, Any] = {}
    for key, value in options.items():
        option = declared[key]
        if key in grid and isinstance(value, list | tuple):
            out[key] = [option.check(v) for v in value]
        else:
            out[key] = option.check(value)
    return out


def resolve(declared: Iterable[Option], options: dict[str, Any]) -> dict[str, Any]:
    """A family's own options, checked, with defaults for the ones not given."""
    return {option.name: option.check(options.get(option.name)) for option in declared}


def reference(families: Iterable[Any]) -> str:
    """The option reference as Markdown, generated from the declarations (docs/options.md)."""
    lines = ["# Family options", "",
             "Generated from the declarations in `workers/families/` by `python -m workers.families`.",
             "Set any of them with `atlas build -o KEY=VALUE` (JSON values), in a sweep file's `options:`, ",
             "or in `POST /api/builds`; each is checked (type, range) before anything runs.", ""]
    for family in families:
        lines += [f"## {family.name}", "", "| option | type | default | range | what |", "|---|---|---|---|---|"]
        for option in getattr(family, "options", ()):  # a plugin family may declare none
            lines.append(f"| `{option.name}` | {option.kind} | `{option.default!r}` | {option.describe_range()} "
                         f"| {option.help} |")
        lines.append("")
    return "\n".join(lines)
