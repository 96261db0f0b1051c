"""Executors run units on loaded models. The in-process one serves unit tests and `--executor local`;
the Ray one (workers/ray_executor.py, the only module that imports ray) serves real builds.
Both yield results as units finish, so the driver can ingest while work goes on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from workers.models import LoadedModel, load
from workers.plan import Unit
from workers.unit import UnitResult, run_unit

Started = Callable[[Unit], None]  # told when a unit starts running (progress lines)


class Executor(Protocol):
    def run(self, units: list[Unit], shard_root: Path, started: Started | None = None) -> Iterator[UnitResult]: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs units in this process, loading each model once."""

    def __init__(self, device: str = "auto", load_options: dict[str, Any] | None = None) -> None:
        self.device = device
        self.load_options = load_options or {}
        self.loaded: dict[str, LoadedModel] = {}

    def model(self, unit: Unit) -> LoadedModel:
        if unit.source.key not in self.loaded:
            self.loaded[unit.source.key] = load(unit.source, self.device, **self.load_options)
        return self.loaded[unit.source.key]

    def run(self, units: list[Unit], shard_root: Path, started: Started | None = None) -> Iterator[UnitResult]:
        for unit in units:
            lm = self.model(unit)
            if started:
                started(unit)
            yield run_unit(lm, unit, shard_root)

    def close(self) -> None:
        self.loaded.clear()
