"""Shards: the only thing workers write. One directory per unit, renamed into place when whole.

A shard holds `run.json` (the run and model rows) and one Parquet file per result table. Workers
never open the DuckDB file; the driver ingests shards, so a crash leaves a replayable log.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from atlas.schema import SHARD_TABLES


def shard_path(shard_root: str | Path, run_id: str) -> Path:
    return Path(shard_root) / run_id


def write_shard(shard_root: str | Path, run: dict[str, Any], model: dict[str, Any],
                tables: dict[str, pa.Table | list[dict[str, Any]]]) -> Path:
    """Write to a temporary directory, then rename: readers see a whole shard or none."""
    unknown = set(tables) - set(SHARD_TABLES)
    if unknown:
        raise ValueError(f"unknown shard tables {sorted(unknown)}; known: {SHARD_TABLES}")
    final = shard_path(shard_root, run["run_id"])
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    for name, table in tables.items():
        if isinstance(table, list):
            if not table:
                continue
            table = pa.Table.from_pylist(table)
        pq.write_table(table, tmp / f"{name}.parquet")
    manifest = {"run": run, "model": model}
    (tmp / "run.json").write_text(json.dumps(manifest, default=str, indent=1))
    if final.exists():  # a retried unit: the newer complete shard wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
