"""Shards: the only thing workers write. One directory per unit, renamed into place when whole.

A shard holds `run.json` (the run and model rows) and one Parquet file per result table. Workers
never open the DuckDB file; the driver ingests shards, so a crash leaves a replayable log.

Every table is written with its Arrow schema, derived from atlas/schema.py
(`schema.arrow_schema`): a row with a column the table lacks, without a column it requires, or
with a value of the wrong type fails here, with the table, column and value named, before
anything is renamed into place. JSON columns (`run_metrics.detail`, `edits.heads`,
`concepts.words`) are stored as JSON text whatever a family hands in (`records.json_text`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from atlas import schema
from atlas.records import RunRecord, json_text

KEYS = ("run_id", "model_key")  # filled from the run where a table has them and a row leaves them out


def shard_path(shard_root: str | Path, run_id: str) -> Path:
    return Path(shard_root) / run_id


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _cell(table: str, i: int, column: sa.Column, value: Any) -> Any:
    """One value as its column's Arrow type takes it; ValueError naming table, column and value."""
    if value is None:
        return None

    def bad(why: str) -> ValueError:
        return ValueError(f"shard table {table}, row {i}, column {column.name}: {_shown(value)} "
                          f"({type(value).__name__}) {why}")

    kind = column.type
    if isinstance(kind, sa.JSON):
        try:
            return json_text(value)
        except ValueError as exc:
            raise bad(str(exc)) from None
    if isinstance(kind, sa.Integer):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad("is not an integer")
        if isinstance(value, numbers.Integral):
            return int(value)
        number = float(value)
        if math.isfinite(number) and number.is_integer():  # 3.0 from a float count: lossless
            return int(number)
        raise bad("is not an integer")
    if isinstance(kind, sa.Double | sa.Float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad("is not a number")
        return float(value)
    if isinstance(kind, sa.Boolean):
        if not isinstance(value, bool):
            raise bad("is not true or false")
        return value
    if isinstance(kind, sa.DateTime):
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                raise bad("is not an ISO timestamp") from None
        if not isinstance(value, datetime):
            raise bad("is not a timestamp")
        return value
    if not isinstance(value, str):
        raise bad("is not a string")
    return value


def arrow_table(name: str, rows: list[dict[str, Any]], run: RunRecord | None = None) -> pa.Table:
    """Rows of one shard table as Arrow with the table's schema; ValueError on an unknown column, a
    missing required one, or a value of the wrong type (naming table, column, row and value).

    With `run`, a row may leave out run_id and model_key: they are the run's."""
    table = schema.metadata.tables[name]
    columns = table.columns
    keys = {k: getattr(run, k) for k in KEYS if k in columns} if run is not None else {}
    converted = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"shard table {name}, row {i}: {_shown(row)} is not a dict of column values")
        unknown = sorted(set(row) - set(columns.keys()))
        if unknown:
            raise ValueError(f"shard table {name}, row {i}: unknown column {unknown[0]!r} "
                             f"(= {_shown(row[unknown[0]])}); its columns: {', '.join(columns.keys())}")
        for key, value in keys.items():
            if key in row and row[key] != value:
                raise ValueError(f"shard table {name}, row {i}, column {key}: {_shown(row[key])} is not the "
                                 f"run's {key} {value!r}")
        row = {**keys, **row}
        out = {}
        for column in columns:
            value = row.get(column.name)
            if value is None and not column.nullable:
                what = "has no value" if column.name in row else "is missing"
                raise ValueError(f"shard table {name}, row {i}: required column {column.name} {what} "
                                 f"(row: {_shown(row)})")
            out[column.name] = _cell(name, i, column, value)
        converted.append(out)
    arrow = schema.arrow_schema(table)
    try:
        return pa.Table.from_pylist(converted, schema=arrow)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:  # e.g. an int past int32
        for column in arrow:
            for i, row in enumerate(converted):
                try:
                    pa.array([row[column.name]], column.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    raise ValueError(f"shard table {name}, row {i}, column {column.name}: "
                                     f"{_shown(row[column.name])} does not fit {column.type}") from None
        raise ValueError(f"shard table {name}: {exc}") from None


def checked_arrow(name: str, table: pa.Table, run: RunRecord | None = None) -> pa.Table | None:
    """An Arrow table checked column by column, without a Python object per value: the same checks as
    `arrow_table` (unknown, missing or null required columns, the run's keys, types), for large
    tables. None where a column's type needs the per-row path (JSON columns, or types that are
    not plainly the column's: bool as a number, numbers as text)."""
    spec = schema.metadata.tables[name]
    target = schema.arrow_schema(spec)
    unknown = sorted(set(table.column_names) - set(spec.columns.keys()))
    if unknown:
        raise ValueError(f"shard table {name}: unknown column {unknown[0]!r}; its columns: "
                         f"{', '.join(spec.columns.keys())}")
    keys = {k: getattr(run, k) for k in KEYS if k in spec.columns} if run is not None else {}
    columns = []
    for field in target:
        column_type = spec.columns[field.name].type
        if isinstance(column_type, sa.JSON):
            return None
        if field.name not in table.column_names:
            if field.name in keys:
                columns.append(pa.array([keys[field.name]] * table.num_rows, field.type))
                continue
            if not field.nullable:
                raise ValueError(f"shard table {name}: required column {field.name} is missing")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        given = column.type
        plain = ((pa.types.is_integer(field.type) and pa.types.is_integer(given))
                 or (pa.types.is_floating(field.type) and (pa.types.is_floating(given) or pa.types.is_integer(given)))
                 or (pa.types.is_string(field.type) and (pa.types.is_string(given) or pa.types.is_large_string(given)))
                 or given == field.type or pa.types.is_null(given))
        if not plain:
            return None
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, OverflowError):
            raise ValueError(f"shard table {name}, column {field.name}: a value does not fit {field.type}") from None
        if not field.nullable and column.null_count:
            raise ValueError(f"shard table {name}: required column {field.name} has no value in "
                             f"{column.null_count} rows")
        if field.name in keys and table.num_rows:
            import pyarrow.compute as pc

            if not pc.all(pc.equal(column, pa.scalar(keys[field.name], field.type))).as_py():
                raise ValueError(f"shard table {name}, column {field.name}: a value is not the run's "
                                 f"{field.name} {keys[field.name]!r}")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def write_shard(shard_root: str | Path, run: RunRecord, model: dict[str, Any],
                tables: dict[str, pa.Table | list[dict[str, Any]]]) -> Path:
    """Check and convert every table, write to a temporary directory, then rename: readers see a
    whole shard or none, and a bad row leaves nothing behind."""
    if not isinstance(run, RunRecord):
        raise TypeError(f"write_shard takes an atlas.records.RunRecord, not {type(run).__name__}")
    unknown = set(tables) - set(schema.SHARD_TABLES)
    if unknown:
        raise ValueError(f"unknown shard tables {sorted(unknown)}; known: {schema.SHARD_TABLES}")
    arrow = {}
    for name, rows in tables.items():
        if isinstance(rows, pa.Table):
            checked = checked_arrow(name, rows, run)
            if checked is not None:
                if checked.num_rows:
                    arrow[name] = checked
                continue
            rows = rows.to_pylist()
        if rows:  # an empty table writes no file
            arrow[name] = arrow_table(name, rows, run)
    final = shard_path(shard_root, run.run_id)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for name, table in arrow.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        manifest = {"run": run.row(), "model": model}
        (tmp / "run.json").write_text(json.dumps(manifest, default=str, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a retried unit: the newer complete shard wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
