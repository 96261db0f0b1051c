"""Shards are written with the Arrow schema of atlas/schema.py: bad rows fail clearly, before anything
is renamed into place; JSON columns have one shape; RunRecord is the runs table, column for column."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlas import schema
from atlas.records import RunRecord, code_version
from atlas.shards import arrow_table, write_shard
from atlas.store import Atlas
from tests.seed import head_rows, ingest, model_row, run_record

MODEL = model_row("m@abc:safetensors", "m", n_layers=2, n_heads=2, n_kv_heads=1)
RUN = run_record("r1", MODEL["model_key"])


def _write(tmp_path: Path, tables: dict[str, Any]) -> Path:
    return write_shard(tmp_path / "shards", RUN, MODEL, tables)


def _leftovers(tmp_path: Path) -> list[str]:
    root = tmp_path / "shards"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- Arrow schemas from atlas/schema.py ------------------------------------------------------------
def test_every_shard_table_has_an_arrow_schema_from_its_sql_table() -> None:
    for name in schema.SHARD_TABLES:
        table = schema.metadata.tables[name]
        arrow = schema.arrow_schema(name)
        assert arrow.names == [c.name for c in table.columns]
        for column in table.columns:
            assert arrow.field(column.name).nullable == column.nullable, (name, column.name)
    head = schema.arrow_schema("head_metrics")
    assert head.field("value").type == pa.float64() and head.field("layer").type == pa.int32()
    assert head.field("n").type == pa.int64()
    assert schema.arrow_schema("run_metrics").field("detail").type == pa.string()  # JSON text
    assert schema.arrow_schema("runs").field("finished_at").type == pa.timestamp("us", tz="UTC")


def test_rows_are_written_with_the_schema_and_the_runs_keys(tmp_path: Path) -> None:
    shard = _write(tmp_path, {"head_metrics": head_rows("x.m", MODEL, n=3)})
    table = pq.read_table(shard / "head_metrics.parquet")
    assert table.schema.equals(schema.arrow_schema("head_metrics"), check_metadata=False)
    assert set(table.column("run_id").to_pylist()) == {"r1"}
    assert set(table.column("model_key").to_pylist()) == {MODEL["model_key"]}
    assert table.column("stderr").null_count == table.num_rows  # a nullable column left out: null


# -- bad rows fail with the table, column and value named, and leave no shard ---------------------
@pytest.mark.parametrize(("rows", "message"), [
    ([{"layer": 0, "head": 0, "metric": "x.m"}], r"head_metrics, row 4: required column value is missing"),
    ([{"layer": 0, "head": 0, "metric": "x.m", "value": None}], r"required column value has no value"),
    ([{"layer": 0, "head": 0, "metric": "x.m", "value": 1.0, "valeu": 2.0}],
     r"head_metrics, row 4: unknown column 'valeu' \(= 2.0\)"),
    ([{"layer": 0, "head": 0, "metric": "x.m", "value": "high"}],
     r"head_metrics, row 4, column value: 'high' \(str\) is not a number"),
    ([{"layer": 0.5, "head": 0, "metric": "x.m", "value": 1.0}],
     r"head_metrics, row 4, column layer: 0.5 \(float\) is not an integer"),
    ([{"layer": True, "head": 0, "metric": "x.m", "value": 1.0}],
     r"head_metrics, row 4, column layer: True \(bool\) is not an integer"),
    ([{"layer": 2**40, "head": 0, "metric": "x.m", "value": 1.0}],
     r"head_metrics, row 4, column layer: 1099511627776 does not fit int32"),
    ([{"layer": 0, "head": 0, "metric": 7, "value": 1.0}],
     r"head_metrics, row 4, column metric: 7 \(int\) is not a string"),
    ([{"layer": 0, "head": 0, "metric": "x.m", "value": 1.0, "run_id": "other"}],
     r"head_metrics, row 4, column run_id: 'other' is not the run's run_id 'r1'"),
])
def test_a_bad_row_fails_before_anything_is_written(tmp_path: Path, rows: list[dict], message: str) -> None:
    good = head_rows("x.m", MODEL)
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, {"run_metrics": [{"metric": "ok", "value": 1.0}], "head_metrics": good + rows})
    assert _leftovers(tmp_path) == []  # no shard, no temporary directory


def test_a_bad_row_leaves_an_earlier_shard_of_the_run_in_place(tmp_path: Path) -> None:
    first = _write(tmp_path, {"head_metrics": head_rows("x.m", MODEL)})
    with pytest.raises(ValueError, match="unknown column"):
        _write(tmp_path, {"head_metrics": [{"layer": 0, "head": 0, "metric": "x.m", "value": 1.0, "oops": 1}]})
    assert _leftovers(tmp_path) == ["r1"]
    assert pq.read_table(first / "head_metrics.parquet").num_rows == 4


def test_unknown_tables_and_untyped_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shard tables"):
        _write(tmp_path, {"head_metric": head_rows("x.m", MODEL)})
    with pytest.raises(TypeError, match="RunRecord"):
        write_shard(tmp_path / "shards", RUN.row(), MODEL, {})  # type: ignore[arg-type]
    assert _leftovers(tmp_path) == []


def test_numpy_numbers_and_integral_floats_are_taken(tmp_path: Path) -> None:
    table = arrow_table("head_metrics", [{"layer": np.int64(1), "head": 1.0, "metric": "x.m",
                                          "value": np.float32(0.5), "n": np.int32(3)}], RUN)
    assert table.to_pylist()[0] | {} == {"run_id": "r1", "model_key": MODEL["model_key"], "layer": 1, "head": 1,
                                         "metric": "x.m", "value": 0.5, "n": 3, "stderr": None}


# -- JSON columns: one shape, whatever a family hands in ------------------------------------------
def test_run_metrics_detail_is_json_text_whatever_the_family_hands_in(tmp_path: Path) -> None:
    """Issue 18: a dict in one family and JSON text in another broke the Parquet shard."""
    db = tmp_path / "a.duckdb"
    detail = {"per_layer": {"0": 0.5}, "k": [1, 2], "x": np.float64(0.25)}
    run_metrics = [{"metric": "a.dict", "value": 1.0, "detail": detail},
                   {"metric": "a.text", "value": 2.0, "detail": json.dumps({"per_layer": {"0": 0.5}})},
                   {"metric": "a.none", "value": None, "detail": None},
                   {"metric": "a.list", "value": 3.0, "detail": [1, 2.5]}]
    edits = [{"edit_id": "e1", "k": 1, "alpha": 0.0, "selection": "pursuit", "heads": [[0, 1]],
              "metric": "concept_mass"},
             {"edit_id": "e2", "k": 1, "alpha": 0.0, "selection": "pursuit", "heads": "[[1, 0]]",
              "metric": "concept_mass"}]
    ingest(db, RUN, MODEL, {"run_metrics": run_metrics, "edits": edits}, tmp_path / "shards")
    shard = pq.read_table(tmp_path / "shards" / "r1" / "run_metrics.parquet")
    assert shard.schema.field("detail").type == pa.string()
    with Atlas(db) as atlas:
        stored = {r["metric"]: r["detail"] for r in atlas.query("SELECT metric, detail FROM run_metrics").to_pylist()}
        heads = [r["heads"] for r in atlas.query("SELECT heads FROM edits ORDER BY edit_id").to_pylist()]
    assert json.loads(stored["a.dict"]) == {"per_layer": {"0": 0.5}, "k": [1, 2], "x": 0.25}
    assert json.loads(stored["a.text"]) == {"per_layer": {"0": 0.5}}
    assert stored["a.none"] is None and json.loads(stored["a.list"]) == [1, 2.5]
    assert [json.loads(h) for h in heads] == [[[0, 1]], [[1, 0]]]


def test_json_text_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run_metrics, row 0, column detail: 'n/a' \(str\) a str is taken as JSON"):
        _write(tmp_path, {"run_metrics": [{"metric": "m", "value": 1.0, "detail": "n/a"}]})
    with pytest.raises(ValueError, match=r"run_metrics, row 0, column detail: .*cannot be written as JSON"):
        _write(tmp_path, {"run_metrics": [{"metric": "m", "value": 1.0, "detail": {"when": object()}}]})
    assert _leftovers(tmp_path) == []


# -- RunRecord ------------------------------------------------------------------------------------
def test_run_record_fields_are_exactly_the_runs_columns() -> None:
    assert [f.name for f in fields(RunRecord)] == [c.name for c in schema.runs.columns]
    assert list(RUN.row()) == [c.name for c in schema.runs.columns]


def test_run_record_fills_timestamps_and_code_version() -> None:
    before = datetime.now(UTC)
    run = RunRecord.ended(run_id="r", model_key="m", family="f", family_version=1, probe_set="p", config={"a": 1},
                          config_hash="h", started=before)
    assert run.code_version == code_version() and run.status == "complete"
    assert run.started_at == before <= run.finished_at <= datetime.now(UTC)
    at = RunRecord.ended(run_id="r", model_key="m", family="f", family_version=1, probe_set="p", config={},
                         config_hash="h", finished="2026-01-01T00:00:00+00:00", code_version="0")
    assert at.started_at == at.finished_at == datetime(2026, 1, 1, tzinfo=UTC)
    row = at.row()
    assert row["finished_at"] == "2026-01-01T00:00:00+00:00" and row["code_version"] == "0"
    assert RunRecord.from_row(json.loads(json.dumps(row))) == at  # run.json and back


@pytest.mark.parametrize(("change", "message"), [
    ({"status": "done"}, "runs.status = 'done' is not one of complete, failed"),
    ({"run_id": ""}, "runs.run_id = '' is not a non-empty string"),
    ({"finished": "yesterday"}, "runs.finished_at = 'yesterday' is not an ISO timestamp"),
])
def test_run_record_refuses_what_the_runs_table_would_not_take(change: dict, message: str) -> None:
    given = {"run_id": "r", "model_key": "m", "family": "f", "family_version": 1, "probe_set": "p", "config": {},
             "config_hash": "h", **change}
    with pytest.raises(ValueError, match=message):
        RunRecord.ended(**given)
    with pytest.raises(ValueError, match="runs has no column extra"):
        RunRecord.from_row({**RUN.row(), "extra": 1})
