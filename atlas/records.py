"""The records every door shares (no torch): one `RunRecord` for a row of `runs`, one
`BuildRequest` for a build, and the one JSON-text form of a JSON column.

`RunRecord` is what workers, `atlas lens train` and the tests hand `atlas.shards.write_shard`;
its fields are exactly the columns of `atlas.schema.runs`. `BuildRequest` is what `atlas build`
turns its flags into, what a sweep-file entry is, and the body of `POST /api/builds`; the values of
its family options are checked by the one validator, `workers.options.validate` (through
`workers.plan.plan`), before anything is planned or written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atlas.errors import BadInput

__all__ = ["NAMED_OPTIONS", "RUN_STATUSES", "BuildRequest", "RunRecord", "code_version", "json_text"]

RUN_STATUSES = ("complete", "failed")


def code_version() -> str:
    """This install's version of head-atlas, recorded with every run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("head-atlas")
    except PackageNotFoundError:
        return "0+unknown"


def _plain(value: Any) -> Any:
    """json.dumps' fallback: numpy scalars and arrays (anything with .tolist()/.item()) as Python values."""
    for method in ("tolist", "item"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(value: Any) -> str:
    """The one shape of a JSON column in a shard: JSON text. A str is taken as JSON text already
    (and must parse); anything else (a dict, a list, a number) is serialised. ValueError otherwise."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as exc:
            raise ValueError(f"a str is taken as JSON text, and this one does not parse ({exc})") from None
        return value
    try:
        return json.dumps(value, default=_plain)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot be written as JSON: {exc}") from None


def _timestamp(value: datetime | str | None, name: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"runs.{name} = {value!r} is not an ISO timestamp") from None
    if not isinstance(value, datetime):
        raise ValueError(f"runs.{name} = {value!r} is not a datetime")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """A row of `runs`: which model, family, probe set and config a run had, and how it ended.

    Build one with `RunRecord.ended(...)` (timestamps and code version filled in) and hand it to
    `write_shard` or `Atlas.record_failure`; `.row()` is the row as the shard's run.json holds it."""

    run_id: str
    model_key: str
    family: str
    family_version: int
    probe_set: str
    config: dict[str, Any]
    config_hash: str
    code_version: str
    device: str | None = None
    tokens: int | None = None
    seconds: float | None = None
    status: str
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES:
            raise ValueError(f"runs.status = {self.status!r} is not one of {', '.join(RUN_STATUSES)}")
        for name in ("run_id", "model_key", "family", "probe_set", "config_hash", "code_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"runs.{name} = {value!r} is not a non-empty string")
        if not isinstance(self.config, dict):
            raise ValueError(f"runs.config = {self.config!r} is not a dict")
        for name in ("started_at", "finished_at"):  # ISO strings (a manifest) become aware datetimes
            object.__setattr__(self, name, _timestamp(getattr(self, name), name))

    @classmethod
    def ended(cls, *, run_id: str, model_key: str, family: str, family_version: int, probe_set: str,
              config: dict[str, Any], config_hash: str, status: str = "complete",
              started: datetime | str | None = None, finished: datetime | str | None = None,
              device: str | None = None, tokens: int | None = None, seconds: float | None = None,
              error: str | None = None, code_version: str | None = None) -> RunRecord:
        """A run that ended at `finished` (default now) after starting at `started` (default: when it
        ended), recorded by this install (`code_version` default: head-atlas's version)."""
        end = _timestamp(finished, "finished_at") or datetime.now(UTC)
        return cls(run_id=run_id, model_key=model_key, family=family, family_version=family_version,
                   probe_set=probe_set, config=config, config_hash=config_hash,
                   code_version=code_version or _installed_version(), status=status, device=device,
                   tokens=tokens, seconds=seconds, error=error,
                   started_at=_timestamp(started, "started_at") or end, finished_at=end)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunRecord:
        """A run row (a shard's run.json, or a row read back) as a record; ValueError naming what is wrong."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(f"runs has no column {', '.join(unknown)} (columns: {', '.join(known)})")
        values = dict(row)
        if isinstance(values.get("config"), str):
            values["config"] = json.loads(values["config"])
        try:
            return cls(**values)
        except TypeError as exc:  # a required column missing
            raise ValueError(f"not a runs row: {exc}") from None

    def row(self) -> dict[str, Any]:
        """The row, column for column as atlas.schema.runs has them; timestamps as ISO text (JSON-ready)."""
        return {f.name: (value.isoformat() if isinstance(value := getattr(self, f.name), datetime) else value)
                for f in fields(self)}


_installed_version = code_version  # RunRecord.ended's `code_version` argument shadows the function


# -- build requests -------------------------------------------------------------------------------
Text = Annotated[str, Field(min_length=1, max_length=4096)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=64)]
Seeds = Annotated[list[int], Field(min_length=1, max_length=64)]

# The family options a BuildRequest names as fields (the `atlas build` flags); any other goes in `options`.
NAMED_OPTIONS = ("seed", "corpus", "text_field", "concepts", "criterion", "verify", "ablation", "method",
                 "max_context")


class BuildRequest(BaseModel):
    """One build: which models, which families, and the family options. The same record whichever
    door it comes through: `atlas build` turns its flags into one, a sweep-file entry is one, and it
    is the body of `POST /api/builds`. Where it runs (device, executor, Ray) is not in it: the CLI,
    the sweep file or the server's operator decides that.

    Field types are checked here; option values (names, types, ranges: `-o n_randon=3`,
    `verify=huge`) by workers.options.validate, which every door reaches through workers.plan.plan
    before anything is written or queued. A list of corpora (or seeds) is a grid: every value runs."""

    model_config = ConfigDict(extra="forbid")
    models: list[Text] = Field(min_length=1, max_length=16, description="Aliases, repo ids, directories or .gguf")
    families: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["all"], min_length=1, max_length=32, description="Family names, or 'all'")
    seed: int | Seeds | None = Field(default=None, description="Seed of the built-in probe sets (a list: a grid)")
    corpus: Text | Texts | None = Field(default=None, description="Corpus file or HF dataset (a list: a grid)")
    text_field: Annotated[str, Field(max_length=256)] | None = None
    concepts: Texts | None = Field(default=None, description="Concepts or concept files (pursuit)")
    criterion: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="SOMP criterion: l1 "
                                                                                                "or l2 (pursuit)")
    verify: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="Editing-check grid: "
                                                                 "small, standard, full or off (pursuit)")
    ablation: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="zero, mean or "
                                                                                               "resample (ablation)")
    method: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="exact, atp or both "
                                                                                           "(ablation)")
    max_context: int | None = Field(default=None, description="Longest haystack in tokens (retrieval)")
    options: dict[Annotated[str, Field(max_length=256)], Any] = Field(
        default_factory=dict, max_length=64, description="Any family option by name (`atlas build -o KEY=VALUE`)")

    @field_validator("families", mode="before")
    @classmethod
    def _comma_families(cls, value: Any) -> Any:
        """`patterns,lens` (the CLI's --families, older sweep files) is the list [patterns, lens]."""
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("concepts", mode="before")
    @classmethod
    def _comma_concepts(cls, value: Any) -> Any:
        """`colors,animals` (the CLI's --concepts) is the list [colors, animals]."""
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    def family_options(self) -> dict[str, Any]:
        """Every family option of the request in one dict, for workers.plan.plan: the named fields
        that are set, and `options`. One option given both ways with different values is refused."""
        named: dict[str, Any] = {name: getattr(self, name) for name in NAMED_OPTIONS
                                 if getattr(self, name) is not None}
        concepts = named.get("concepts")
        if isinstance(concepts, list) and all(isinstance(c, str) for c in concepts):
            named["concepts"] = ",".join(concepts)  # the pursuit family splits on commas
        clash = sorted(k for k in named if k in self.options and self.options[k] != named[k])
        if clash:
            name = clash[0]
            raise BadInput(f"option '{name}' is given twice, as {name}={named[name]!r} and in options as "
                           f"{self.options[name]!r}", f"give {name} once (the flag, or -o {name}=..., not both)")
        return {**self.options, **named}
