"""Sweeps: `atlas build` and `atlas sweep FILE` run the same driver; `atlas status` follows it.

The commands themselves are registered in cli/main.py, which imports this module when one runs:
pydantic, YAML and the build driver stay out of the read commands' start-up."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from atlas.errors import BadInput, NotFound
from atlas.records import BuildRequest
from cli.output import emit_json, stderr


class BuildProgress:
    """Progress on stderr, fed by the driver's events: a live bar in a terminal; one plain line per unit
    started and finished when stderr is a log or a pipe (CI, `make atlas > log`)."""

    def __enter__(self) -> BuildProgress:
        self.start = time.perf_counter()
        self.done = 0
        self.live = stderr.is_terminal
        self.families: dict[str, str] = {}
        if not self.live:
            self._line("planning and checking options")
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=stderr, transient=False)
        self.bar.start()
        self.task = self.bar.add_task("planning, loading models", total=None, rate="")
        return self

    def _line(self, text: str) -> None:
        stderr.print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", highlight=False, markup=False,
                     soft_wrap=True)

    def __call__(self, event: str, payload: Any) -> None:
        if not self.live:
            self._plain(event, payload)
            return
        if event == "plan":  # a sweep of several builds plans each in turn
            self.done = 0
            self.bar.update(self.task, total=payload["todo"], completed=0,
                            description=f"units ({payload['skipped']} done before)")
        elif event == "start":
            self.bar.update(self.task, description=f"running {payload.family} on {payload.source.alias or 'model'}")
        elif event == "unit":
            self.done += 1
            minutes = (time.perf_counter() - self.start) / 60
            state = "done" if payload.ok else "[red]failed[/]"
            self.bar.update(self.task, advance=1, rate=f"{self.done / max(minutes, 1e-9):.1f} units/min",
                            description=f"{state} {payload.run_id}")

    def _plain(self, event: str, payload: Any) -> None:
        if event == "plan":
            self.total, self.done = payload["todo"], 0
            self._line(f"{payload['planned']} units planned, {payload['skipped']} already done, "
                       f"{payload['todo']} to run" + ("; loading the model" if payload["todo"] else ""))
        elif event == "start":
            self.families[payload.run_id] = f"{payload.family} on {payload.source.alias or payload.source.key}"
            self._line(f"started  {self.families[payload.run_id]} ({payload.run_id})")
        elif event == "unit":
            self.done += 1
            what = self.families.get(payload.run_id, payload.run_id)
            if payload.ok:
                self._line(f"finished {what} in {payload.seconds:.1f} s, {payload.rows} rows "
                           f"[{self.done}/{self.total}]")
            else:
                first = (payload.error or "unknown error").splitlines()[0]
                self._line(f"FAILED   {what} after {payload.seconds:.1f} s: {first} [{self.done}/{self.total}]")

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()


def checked_builds(requests: list[BuildRequest], labels: list[str], device: str,
                   address: str | None) -> list[tuple[BuildRequest, list[str], list[Any]]]:
    """Plan every request before any of them runs: models resolved, families known, and every family
    option checked by the one validator (workers.plan.plan -> workers.options.validate). A problem
    raises, naming the request by its label (a sweep-file entry), and nothing is written."""
    from atlas.errors import AtlasError
    from workers.build import plan_build
    from workers.models import resolve
    from workers.plan import family_names

    checked = []
    for request, label in zip(requests, labels, strict=True):
        try:
            families = family_names(request.families)
            sources = [resolve(spec) for spec in request.models]
            plan_build(request.models, families, request.family_options(), device, address, sources)
        except AtlasError as exc:
            if not label:
                raise
            raise type(exc)(f"{label}: {exc.message}", exc.hint) from None
        checked.append((request, families, sources))
    return checked


def run_and_report(requests: list[BuildRequest], db: Path, as_json: bool, *, device: str = "auto",
                   address: str | None = None, labels: list[str] | None = None, **build_kwargs: Any) -> None:
    """Check every request, then build them in turn into `db`, with progress on stderr and one summary."""
    from workers.build import BuildReport, build

    total = BuildReport()
    # Ray's driver prints worker events (a restarted actor, say) to stdout; stdout is for data only.
    with BuildProgress() as progress, contextlib.redirect_stdout(sys.stderr):
        checked = checked_builds(requests, labels or [""] * len(requests), device, address)
        for request, families, sources in checked:
            report = build(request.models, families, db, options=request.family_options(), progress=progress,
                           device=device, address=address, sources=sources, **build_kwargs)
            total.planned += report.planned
            total.skipped += report.skipped
            total.replayed += report.replayed
            total.completed += report.completed
            total.failed.update(report.failed)
            total.rows += report.rows
            total.tokens += report.tokens
            total.seconds += report.seconds
    report = total
    summary = {"db": str(db), "planned": report.planned, "skipped": report.skipped, "replayed": report.replayed,
               "completed": len(report.completed), "failed": report.failed, "rows": report.rows,
               "tokens": report.tokens, "seconds": round(report.seconds, 2)}
    if as_json:
        emit_json(summary)
    else:
        replayed = f"{report.replayed} ingested from an interrupted build's shards, " if report.replayed else ""
        stderr.print(f"{report.planned} units planned, {report.skipped} already done, {replayed}"
                     f"{len(report.completed)} built ({report.rows} rows), {len(report.failed)} failed -> {db}")
        for run_id, error in report.failed.items():
            stderr.print(f"[red]failed[/] {run_id}: {error.splitlines()[0]}")
        if report.failed:
            stderr.print("see `atlas status`; running the same command again retries the failed units")
    if report.failed:
        raise typer.Exit(1)


def build_request(fields: dict[str, Any], where: str) -> BuildRequest:
    """A BuildRequest from the CLI's flags or a sweep-file entry; BadInput naming `where` and each problem."""
    try:
        return BuildRequest.model_validate(fields)
    except ValidationError as exc:
        raise BadInput(f"{where}: {_problems(exc)}", "see `atlas build --help` and docs/options.md") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())


class RaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    replicas: int = 1
    gpus_per_actor: float | None = None


class SweepFile(BaseModel):
    """A sweep file: where the builds run (db, device, executor, ray), and what they are. One build
    is written with BuildRequest's fields at the top level (models, families, corpora or corpus,
    options, seed, criterion, ...: each means what the `atlas build` option of that name means);
    several under `builds:`, a list of such entries."""

    model_config = ConfigDict(extra="forbid")
    db: str | None = None
    device: str = "auto"
    executor: str = "ray"
    ray: RaySettings = RaySettings()
    builds: list[BuildRequest]
    labels: list[str] = []  # how messages name each entry: the file, or the file and entry number

    @property
    def models(self) -> list[str]:
        """Every model the sweep builds, in order, each once."""
        return list(dict.fromkeys(m for request in self.builds for m in request.models))


SWEEP_KEYS = ("db", "device", "executor", "ray")


def _entry(raw: Any, where: str) -> BuildRequest:
    """One sweep entry: BuildRequest's fields; `corpora:` (a list, [] for the embedded corpus) as
    older sweep files write `corpus:`."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: expected a mapping of build fields (models, families, options, ...), "
                       f"got {type(raw).__name__}", "see the README's sweep.yaml example")
    fields = dict(raw)
    if "corpora" in fields:
        corpora = fields.pop("corpora")
        if "corpus" in fields:
            raise BadInput(f"{where}: both corpora and corpus are given", "keep one of them")
        if corpora:
            fields["corpus"] = corpora
    return build_request(fields, where)


def load_sweep(path: Path) -> SweepFile:
    from workers.user_files import read_text  # regular files only, bounded, UTF-8 (a clear error otherwise)

    if not path.exists():
        raise NotFound(f"no sweep file at {path}", "see the README's sweep.yaml example")
    try:
        raw = yaml.safe_load(read_text(path, "sweep file")) or {}
    except yaml.YAMLError as exc:
        raise BadInput(f"{path} is not valid YAML: {exc}", "fix the syntax") from exc
    if not isinstance(raw, dict):
        raise BadInput(f"{path} is not a valid sweep: expected a mapping at the top", "see the README's sweep.yaml "
                                                                                    "example")
    settings = {k: v for k, v in raw.items() if k in SWEEP_KEYS}
    entry = {k: v for k, v in raw.items() if k not in (*SWEEP_KEYS, "builds")}
    if "builds" in raw:
        if entry:
            raise BadInput(f"{path}: {', '.join(entry)} given at the top and a builds: list too",
                           "put every build's fields inside its entry under builds:")
        listed = raw["builds"]
        if not isinstance(listed, list) or not listed:
            raise BadInput(f"{path}: builds: must be a non-empty list of builds", "see docs/scale.md")
        labels = [f"{path} builds entry {i + 1}" for i in range(len(listed))]
        requests = [_entry(item, label) for item, label in zip(listed, labels, strict=True)]
    else:
        labels = [str(path)]
        requests = [_entry(entry, f"{path} is not a valid sweep")]
    try:
        return SweepFile.model_validate({**settings, "builds": requests, "labels": labels})
    except ValidationError as exc:
        raise BadInput(f"{path} is not a valid sweep: {_problems(exc)}", "see the README's sweep.yaml example") from exc
