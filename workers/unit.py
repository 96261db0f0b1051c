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

from atlas import schema
from atlas.shards import write_shard
from workers.families import get_family
from workers.models import LoadedModel
from workers.plan import Unit

log = logging.getLogger(__name__)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("head-atlas")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class UnitResult:
    run_id: str
    ok: bool
    shard: str | None = None
    run: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    tokens: int = 0
    rows: int = 0  # rows in the shard, over every table


def run_row(unit: Unit, lm: LoadedModel, status: str, started: datetime, seconds: float,
            tokens: int, config: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    definitions = getattr(get_family(unit.family), "definitions", {})  # provenance, outside the hash
    return {"run_id": unit.run_id, "model_key": unit.source.key, "family": unit.family,
            "family_version": unit.family_version, "probe_set": unit.probe_set,
            "config": {**config, "definitions": definitions} if definitions else config,
            "config_hash": unit.config_hash, "code_version": code_version(), "device": lm.device,
            "tokens": tokens, "seconds": seconds, "status": status, "error": error,
            "started_at": started.isoformat(), "finished_at": datetime.now(UTC).isoformat()}


def _keys_for(table: str, key: dict[str, Any]) -> dict[str, Any]:
    """The run_id / model_key columns this table has (concepts has neither, run_metrics no model_key)."""
    columns = schema.metadata.tables[table].columns
    return {k: v for k, v in key.items() if k in columns}


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
        run = run_row(unit, lm, "failed", started, seconds, 0, unit.config, error)
        return UnitResult(unit.run_id, False, run=run, model=lm.models_row(), error=error,
                          seconds=seconds)
    seconds = time.perf_counter() - t0
    bad = first_non_finite(result.tables)
    if bad is not None:  # a NaN that became the latest value would replace good scores in every view
        error = (f"non-finite value in {bad}: the unit's result is not stored; check the options "
                 "(a probe set too small for the metric?) or report it as a bug")
        run = run_row(unit, lm, "failed", started, seconds, 0, unit.config, error)
        return UnitResult(unit.run_id, False, run=run, model=lm.models_row(), error=error, seconds=seconds)
    config = {**unit.config, **result.extra_config, "attempts": len(errors) + 1, "batch_divisor": divisor}
    if errors:
        config["retried_after"] = errors
    run = run_row(unit, lm, "complete", started, seconds, result.tokens, config)
    key = {"run_id": unit.run_id, "model_key": unit.source.key}
    tables = {name: [{**_keys_for(name, key), **row} for row in rows] for name, rows in result.tables.items()}
    shard = write_shard(shard_root, run, lm.models_row(), tables)
    return UnitResult(unit.run_id, True, shard=str(shard), run=run, model=lm.models_row(),
                      seconds=seconds, tokens=result.tokens, rows=sum(len(rows) for rows in tables.values()))
