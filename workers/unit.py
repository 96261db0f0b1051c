"""Run one unit on a loaded model and write its shard: the plain function Ray wraps."""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlas.records import RunRecord
from atlas.shards import write_shard
from workers.families import get_family
from workers.models import LoadedModel
from workers.plan import Unit

log = logging.getLogger(__name__)


@dataclass
class UnitResult:
    run_id: str
    ok: bool
    shard: str | None = None
    run: dict[str, Any] | None = None  # the run's row, RunRecord.row(): JSON-ready, as run.json holds it
    model: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    tokens: int = 0
    rows: int = 0  # rows in the shard, over every table


def unit_run(unit: Unit, status: str, config: dict[str, Any], *, device: str | None = None,
             started: datetime | None = None, seconds: float = 0.0, tokens: int = 0,
             error: str | None = None) -> RunRecord:
    """The unit's run, ended now; the family's prose definitions go with the config, outside its hash."""
    definitions = getattr(get_family(unit.family), "definitions", {})
    return RunRecord.ended(run_id=unit.run_id, model_key=unit.source.key, family=unit.family,
                           family_version=unit.family_version, probe_set=unit.probe_set,
                           config={**config, "definitions": definitions} if definitions else config,
                           config_hash=unit.config_hash, status=status, started=started, device=device,
                           tokens=tokens, seconds=seconds, error=error)


def first_non_finite(tables: dict[str, list[dict[str, Any]]]) -> str | None:
    """Where the first NaN or infinity in a unit's rows is ('head_metrics: metric=..., layer=3, head=1,
    column value = nan'), or None when every number is finite (None values are allowed: 'not measured')."""
    for table, rows in tables.items():
        for row in rows:
            for column, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    where = ", ".join(f"{k}={row[k]}" for k in ("metric", "concept", "edit_id", "layer", "head")
                                      if k in row)
                    return f"{table}: {where}, column {column} = {value}"
    return None


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_unit(lm: LoadedModel, unit: Unit, shard_root: str | Path, max_attempts: int = 3) -> UnitResult:
    """Run a unit; on an exception (out of memory, say) retry with half the batch, up to max_attempts."""
    started, t0 = datetime.now(UTC), time.perf_counter()
    errors = []
    for attempt in range(max_attempts):
        divisor = 2**attempt
        try:
            result = get_family(unit.family).run(lm, {**unit.config, "_batch_divisor": divisor})
            break
        except Exception as exc:  # a unit failure is data for `atlas status`, not a crash
            errors.append(f"attempt {attempt + 1} (batch / {divisor}): {type(exc).__name__}: {exc}")
            last_trace = traceback.format_exc(limit=5)
            _free_memory()
    else:
        seconds = time.perf_counter() - t0
        log.error("unit %s failed:\n%s", unit.run_id, last_trace)  # the traceback stays in the worker's log:
        error = "\n".join(errors)  # runs.error is readable through SQL and the server, so no source paths
        run = unit_run(unit, "failed", unit.config, device=lm.device, started=started, seconds=seconds,
                       error=error)
        return UnitResult(unit.run_id, False, run=run.row(), model=lm.models_row(), error=error,
                          seconds=seconds)
    seconds = time.perf_counter() - t0
    bad = first_non_finite(result.tables)
    if bad is not None:  # a NaN that became the latest value would replace good scores in every view
        error = (f"non-finite value in {bad}: the unit's result is not stored; check the options "
                 "(a probe set too small for the metric?) or report it as a bug")
        run = unit_run(unit, "failed", unit.config, device=lm.device, started=started, seconds=seconds,
                       error=error)
        return UnitResult(unit.run_id, False, run=run.row(), model=lm.models_row(), error=error, seconds=seconds)
    config = {**unit.config, **result.extra_config, "attempts": len(errors) + 1, "batch_divisor": divisor}
    if errors:
        config["retried_after"] = errors
    run = unit_run(unit, "complete", config, device=lm.device, started=started, seconds=seconds,
                   tokens=result.tokens)
    try:
        shard = write_shard(shard_root, run, lm.models_row(), result.tables)  # run_id, model_key: the run's
    except ValueError as exc:  # a row that does not fit the schema: nothing was written
        error = f"the unit's rows do not fit the atlas schema: {exc}; report it as a bug"
        run = unit_run(unit, "failed", unit.config, device=lm.device, started=started, seconds=seconds,
                       error=error)
        return UnitResult(unit.run_id, False, run=run.row(), model=lm.models_row(), error=error, seconds=seconds)
    return UnitResult(unit.run_id, True, shard=str(shard), run=run.row(), model=lm.models_row(), seconds=seconds,
                      tokens=result.tokens, rows=sum(len(rows) for rows in result.tables.values()))
