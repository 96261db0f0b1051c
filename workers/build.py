"""The build driver: plan, skip what is done, run the rest, ingest shards as they arrive.

The driver is the atlas's only writer during a build. It holds a build lock for the whole build
(a second build on the same atlas fails at once) but opens the DuckDB file only for short ingest
transactions, so readers get in between.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import Busy
from atlas.store import Atlas
from workers.families import get_family
from workers.models import ModelSource, pick_device, resolve
from workers.plan import Unit, plan
from workers.unit import UnitResult


def shard_root(db: Path) -> Path:
    return db.with_name(db.stem + "_shards")


@contextmanager
def build_lock(db: Path) -> Iterator[None]:
    lock_path = db.with_name(db.name + ".build.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Busy(f"another build ({holder}) is running on {db}",
                       "wait for it to finish, or build into another --db") from None
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
    planned: int = 0
    skipped: int = 0
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    seconds: float = 0.0
    tokens: int = 0


Progress = Callable[[str, Any], None]  # (event, payload): "plan" n, "skip" n, "unit" UnitResult


def completed_runs(db: Path, units: list[Unit]) -> set[str]:
    if not db.exists():
        return set()
    with Atlas(db) as atlas:
        return atlas.completed_runs([u.run_id for u in units])


def build(models: list[str], families: list[str], db: str | Path, *, device: str = "auto",
          address: str | None = None, executor: str = "ray", options: dict[str, Any] | None = None,
          load_options: dict[str, Any] | None = None, progress: Progress | None = None,
          sources: list[ModelSource] | None = None,
          open_writer: Callable[[], AbstractContextManager[Atlas]] | None = None,
          take_lock: bool = True) -> BuildReport:
    """Build (or resume) an atlas. Bad input raises before anything is written.

    A process that already is the atlas's single writer (`atlas serve`) passes `open_writer`
    (its own connection) and `take_lock=False`; the ingest code is the same.
    """
    db = Path(db)
    writer = open_writer or (lambda: Atlas.writer(db))
    notify = progress or (lambda event, payload: None)
    for name in families:
        get_family(name)
    sources = sources or [resolve(m) for m in models]
    resolved = device if (device != "auto" or address) else pick_device(device)
    dtype = {"cuda": "bfloat16", "cpu": "float32"}.get(resolved, "auto")
    units = plan(sources, families, options or {}, dtype)
    report = BuildReport(planned=len(units))
    with build_lock(db) if take_lock else nullcontext():
        if open_writer is None:
            done = completed_runs(db, units)
        else:
            with writer() as atlas:
                done = atlas.completed_runs([u.run_id for u in units])
        todo = [u for u in units if u.run_id not in done]
        report.skipped = len(units) - len(todo)
        notify("plan", {"planned": len(units), "todo": len(todo)})
        if not todo:
            return report
        runner = _executor(executor, address, device, load_options or {})
        root = shard_root(db)
        root.mkdir(parents=True, exist_ok=True)
        try:
            for result in runner.run(todo, root):
                _ingest(writer, result, report)
                notify("unit", result)
        finally:
            runner.close()
    return report


def _ingest(writer: Callable[[], AbstractContextManager[Atlas]], result: UnitResult,
            report: BuildReport) -> None:
    with writer() as atlas:
        if result.ok:
            report.rows += atlas.ingest(result.shard)
            report.completed.append(result.run_id)
            report.seconds += result.seconds
            report.tokens += result.tokens
        else:
            atlas.record_failure(result.run, result.model)
            report.failed[result.run_id] = result.error or "unknown error"


def _executor(kind: str, address: str | None, device: str, load_options: dict[str, Any]) -> Any:
    if kind == "local":
        from workers.executors import InProcessExecutor

        return InProcessExecutor(device, load_options)
    from workers.ray_executor import RayExecutor

    return RayExecutor(address, device, load_options)
