"""The build driver: plan, skip what is done, run the rest, ingest shards as they arrive.

The driver is the atlas's only writer during a build. It holds a build lock for the whole build
(a second build on the same atlas fails at once) but opens the DuckDB file only for short ingest
transactions, so readers get in between. Shards are a replayable log: a shard that was written but
not ingested (the driver was killed) is ingested on the next run instead of being recomputed.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlas.errors import Busy
from atlas.records import RunRecord
from atlas.status import lock_path, shard_root, write_status
from atlas.store import Atlas
from workers.families import get_family
from workers.models import ModelSource, pick_device, resolve
from workers.plan import Unit, plan
from workers.unit import UnitResult

__all__ = ["BuildReport", "build", "build_lock", "shard_root"]


@contextmanager
def build_lock(db: Path) -> Iterator[None]:
    path = lock_path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Busy(f"another build ({holder}) is running on {db}",
                       "wait for it to finish (see `atlas status`), or build into another --db") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


@dataclass
class BuildReport:
    """What a build did: every planned unit is in exactly one of skipped, replayed, completed and failed."""

    planned: int = 0
    skipped: int = 0
    replayed: int = 0  # shards written by an earlier, interrupted driver and ingested now
    completed: list[str] = field(default_factory=list)  # computed and ingested by this build
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    seconds: float = 0.0
    tokens: int = 0


Progress = Callable[[str, Any], None]  # (event, payload): "plan" dict, "start" Unit, "unit" UnitResult
Writer = Callable[[], AbstractContextManager[Atlas]]


def completed_runs(db: Path, units: list[Unit]) -> set[str]:
    if not db.exists():
        return set()
    with Atlas(db) as atlas:
        return atlas.completed_runs([u.run_id for u in units])


GRID_OPTIONS = ("corpus", "seed")  # options that may be lists: the sweep runs every value


def expand_grid(options: dict[str, Any]) -> list[dict[str, Any]]:
    """{"corpus": [a, b], "seed": [0, 1]} -> four option dicts, one per combination."""
    grids: list[dict[str, Any]] = [{}]
    for key, value in options.items():
        values = value if key in GRID_OPTIONS and isinstance(value, list | tuple) else [value]
        grids = [{**g, key: v} for g in grids for v in (values or [None])]
    return [{k: v for k, v in g.items() if v is not None} for g in grids]


def plan_build(models: list[str], families: list[str], options: dict[str, Any], device: str,
               address: str | None, sources: list[ModelSource] | None = None) -> list[Unit]:
    """Resolve models and plan every unit; raises on bad input before anything is written."""
    for name in families:
        get_family(name)
    sources = sources or [resolve(m) for m in models]
    resolved = device if (device != "auto" or address) else pick_device(device)
    dtype = {"cuda": "bfloat16", "cpu": "float32"}.get(resolved, "auto")
    units: dict[str, Unit] = {}
    for given in expand_grid(options):  # families that ignore an axis plan the same unit each time
        for unit in plan(sources, families, given, dtype):
            units.setdefault(unit.run_id, unit)
    return list(units.values())


def build(models: list[str], families: list[str], db: str | Path, *, device: str = "auto",
          address: str | None = None, executor: str = "ray", options: dict[str, Any] | None = None,
          load_options: dict[str, Any] | None = None, progress: Progress | None = None,
          sources: list[ModelSource] | None = None, open_writer: Writer | None = None,
          take_lock: bool = True, replicas: int = 1, gpus_per_actor: float | None = None) -> BuildReport:
    """Build (or resume) an atlas. Bad input raises before anything is written.

    A process that already is the atlas's single writer (`atlas serve`) passes `open_writer`
    (its own connection) and `take_lock=False`; the ingest code is the same.
    """
    db = Path(db)
    writer = open_writer or (lambda: Atlas.writer(db))
    notify = progress or (lambda event, payload: None)
    units = plan_build(models, families, options or {}, device, address, sources)
    report = BuildReport(planned=len(units))
    with build_lock(db) if take_lock else nullcontext():
        if open_writer is None:
            done = completed_runs(db, units)
        else:
            with writer() as atlas:
                done = atlas.completed_runs([u.run_id for u in units])
        todo = [u for u in units if u.run_id not in done]
        report.skipped = len(units) - len(todo)
        root = shard_root(db)
        status = _Status(db, units, done)
        todo = _replay_orphans(todo, root, writer, report, status, notify)
        notify("plan", {"planned": len(units), "todo": len(todo), "skipped": report.skipped})
        if not todo:
            return report
        root.mkdir(parents=True, exist_ok=True)
        runner = _executor(executor, address, device, load_options or {}, replicas, gpus_per_actor)
        try:
            status.mark([u.run_id for u in todo], "running")
            by_id = {u.run_id: u for u in todo}
            for result in runner.run(todo, root, lambda unit: notify("start", unit)):
                _ingest(writer, by_id[result.run_id], result, report)
                status.mark([result.run_id], "complete" if result.ok else "failed", result.error)
                notify("unit", result)
        finally:
            runner.close()
    return report


class _Status:
    """The status file `atlas status` reads; rewritten atomically as units move."""

    def __init__(self, db: Path, units: list[Unit], done: set[str]) -> None:
        self.db = db
        self.started = datetime.now(UTC).isoformat()
        self.units = {u.run_id: {"run_id": u.run_id, "model": u.source.alias or u.source.key,
                                 "family": u.family, "probe_set": u.probe_set,
                                 "state": "complete" if u.run_id in done else "pending", "error": None}
                      for u in units}
        self.flush()

    def mark(self, run_ids: list[str], state: str, error: str | None = None) -> None:
        for run_id in run_ids:
            self.units[run_id].update(state=state, error=error)
        self.flush()

    def flush(self) -> None:
        write_status(self.db, {"pid": os.getpid(), "started_at": self.started,
                               "units": list(self.units.values())})


def _replay_orphans(todo: list[Unit], root: Path, writer: Writer, report: BuildReport, status: _Status,
                    notify: Progress) -> list[Unit]:
    left = []
    for unit in todo:
        manifest = root / unit.run_id / "run.json"
        if manifest.exists() and json.loads(manifest.read_text())["run"]["status"] == "complete":
            with writer() as atlas:
                report.rows += atlas.ingest(manifest.parent)
            report.replayed += 1  # not also in `completed`: planned = skipped + replayed + completed + failed
            status.mark([unit.run_id], "complete")
        else:
            left.append(unit)
    return left


def _ingest(writer: Writer, unit: Unit, result: UnitResult, report: BuildReport) -> None:
    with writer() as atlas:
        if result.ok and result.shard is not None:
            report.rows += atlas.ingest(result.shard)
            report.completed.append(result.run_id)
            report.seconds += result.seconds
            report.tokens += result.tokens
            return
        run = RunRecord.from_row(result.run) if result.run else _failed_run(unit, result.error)
        atlas.record_failure(run, result.model)
        report.failed[result.run_id] = result.error or "unknown error"


def _failed_run(unit: Unit, error: str | None) -> RunRecord:
    """The run of a unit whose worker died before it could report."""
    return RunRecord.ended(run_id=unit.run_id, model_key=unit.source.key, family=unit.family,
                           family_version=unit.family_version, probe_set=unit.probe_set, config=unit.config,
                           config_hash=unit.config_hash, status="failed", error=error, seconds=0.0, tokens=0)


def _executor(kind: str, address: str | None, device: str, load_options: dict[str, Any], replicas: int,
              gpus_per_actor: float | None) -> Any:
    if kind == "local":
        from workers.executors import InProcessExecutor

        return InProcessExecutor(device, load_options)
    from workers.ray_executor import RayExecutor

    return RayExecutor(address, device, load_options, replicas=replicas, gpus_per_actor=gpus_per_actor)
