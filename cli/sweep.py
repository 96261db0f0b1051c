"""Sweeps: `atlas build` and `atlas sweep FILE` run the same driver; `atlas status` follows it."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from atlas.errors import BadInput, NotFound
from cli.app import DEFAULT_DB, DbOption, FormatOption, JsonFlag, app, output_format, reports_errors
from cli.output import Format, emit, emit_json, stderr


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
        if event == "plan":
            self.bar.update(self.task, total=payload["todo"], description=f"units ({payload['skipped']} done before)")
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
            self.total = payload["todo"]
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


def run_and_report(models: list[str], families: list[str], db: Path, options: dict[str, Any], as_json: bool,
                   **build_kwargs: Any) -> None:
    from workers.build import build

    # Ray's driver prints worker events (a restarted actor, say) to stdout; stdout is for data only.
    with BuildProgress() as progress, contextlib.redirect_stdout(sys.stderr):
        report = build(models, families, db, options=options, progress=progress, **build_kwargs)
    summary = {"db": str(db), "planned": report.planned, "skipped": report.skipped, "replayed": report.replayed,
               "completed": len(report.completed), "failed": report.failed, "rows": report.rows,
               "tokens": report.tokens, "seconds": round(report.seconds, 2)}
    if as_json:
        emit_json(summary)
    else:
        stderr.print(f"{report.planned} units planned, {report.skipped} already done, "
                     f"{len(report.completed)} built ({report.rows} rows), {len(report.failed)} failed -> {db}")
        for run_id, error in report.failed.items():
            stderr.print(f"[red]failed[/] {run_id}: {error.splitlines()[0]}")
        if report.failed:
            stderr.print("see `atlas status`; running the same command again retries the failed units")
    if report.failed:
        raise typer.Exit(1)


class RaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    replicas: int = 1
    gpus_per_actor: float | None = None


class SweepFile(BaseModel):
    """The sweep file: every field has the meaning of the `atlas build` option of the same name."""

    model_config = ConfigDict(extra="forbid")
    models: list[str]
    families: list[str] | str = "all"
    corpora: list[str] = []
    db: str | None = None
    device: str = "auto"
    executor: str = "ray"
    options: dict[str, Any] = {}
    ray: RaySettings = RaySettings()


def load_sweep(path: Path) -> SweepFile:
    from workers.user_files import read_text  # regular files only, bounded, UTF-8 (a clear error otherwise)

    if not path.exists():
        raise NotFound(f"no sweep file at {path}", "see the README's sweep.yaml example")
    try:
        return SweepFile.model_validate(yaml.safe_load(read_text(path, "sweep file")) or {})
    except yaml.YAMLError as exc:
        raise BadInput(f"{path} is not valid YAML: {exc}", "fix the syntax") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"{path} is not a valid sweep: {problems}", "see the README's sweep.yaml example") from exc


@app.command()
@reports_errors
def sweep(
    file: Annotated[Path, typer.Argument(help="A sweep YAML file: models, families, corpora, options, ray.")],
    db: Annotated[Path | None, typer.Option("--db", envvar="ATLAS_DB", help="Overrides the file's db.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a sweep of many models x families x corpora from a YAML file (resumable).

    Example: atlas sweep docker/sweep.yaml
    """
    from workers.families import FAMILIES

    spec = load_sweep(file)
    families = list(FAMILIES) if spec.families == "all" else (
        spec.families.split(",") if isinstance(spec.families, str) else spec.families)
    options = {**spec.options, **({"corpus": spec.corpora} if spec.corpora else {})}
    run_and_report(spec.models, families, Path(db or spec.db or DEFAULT_DB), options, as_json,
                   device=spec.device, address=spec.ray.address, executor=spec.executor,
                   replicas=spec.ray.replicas, gpus_per_actor=spec.ray.gpus_per_actor)


@app.command()
@reports_errors
def status(
    db: DbOption = Path(DEFAULT_DB),
    all_units: Annotated[bool, typer.Option("--all", help="List complete units too.")] = False,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Show the latest build on this atlas: units done, running, failed (with the error), left.

    Example: atlas status --db atlas.duckdb
    """
    from atlas.status import read_status

    state = read_status(db)
    if state is None:
        raise NotFound(f"no build has run on {db}", "run `atlas build` first")
    units = state["units"]
    counts = {s: sum(u["state"] == s for u in units) for s in ("complete", "running", "pending", "failed",
                                                                 "interrupted")}
    fmt = output_format(fmt, as_json)
    if fmt is Format.json:
        emit_json({"live": state["live"], "pid": state["pid"], "started_at": state["started_at"],
                   "counts": counts, "units": units})
        return
    stderr.print(f"build pid {state['pid']} started {state['started_at']}: "
                 f"{'running' if state['live'] else 'not running'}; "
                 + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    shown = [dict(u, error=(u["error"] or "").splitlines()[0] if u["error"] else "")
             for u in units if all_units or u["state"] != "complete"]
    emit(pa.Table.from_pylist(shown) if shown else pa.table({"state": pa.array([], pa.string())}), fmt,
         title="units")
