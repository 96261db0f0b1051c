"""The atlas file: schema, idempotent ingest, read-only queries, versions, locks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from atlas import schema
from atlas.errors import BadInput, Busy, NotFound, SchemaMismatch
from atlas.shards import write_shard
from atlas.store import Atlas

MODEL = {"model_key": "m@abc:safetensors", "alias": "m", "source": "m", "format": "safetensors",
         "dtype": "float32", "architecture": "LlamaForCausalLM", "n_layers": 3, "n_heads": 4,
         "n_kv_heads": 2, "d_model": 32, "d_head": 8, "vocab_size": 96}


def _run(run_id: str = "patterns-1", finished: str = "2026-01-01T00:00:00+00:00") -> dict:
    return {"run_id": run_id, "model_key": MODEL["model_key"], "family": "patterns", "family_version": 1,
            "probe_set": "p", "config": {"n": 1}, "config_hash": "h", "code_version": "0", "status": "complete",
            "started_at": finished, "finished_at": finished}


def _rows(value: float, run_id: str = "patterns-1") -> list[dict]:
    return [{"run_id": run_id, "model_key": MODEL["model_key"], "layer": layer, "head": head,
             "metric": "patterns.induction", "value": value + layer + head / 10, "n": 10, "stderr": 0.1}
            for layer in range(3) for head in range(4)]


def test_ingest_is_idempotent_and_views_work(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    shard = write_shard(tmp_path / "shards", _run(), MODEL, {"head_metrics": _rows(0.0)})
    with Atlas.writer(db) as atlas:
        assert atlas.ingest(shard) == 12
        assert atlas.ingest(shard) == 12
    with Atlas(db) as atlas:
        assert atlas.query("SELECT count(*) AS n FROM head_metrics").column("n")[0].as_py() == 12
        heads = atlas.query("SELECT * FROM heads WHERE layer = 2 AND head = 3").to_pylist()[0]
        assert heads["kv_head"] == 1 and heads["depth"] == pytest.approx(1.0)
        wide = atlas.query('SELECT "patterns.induction" AS v FROM head_roles WHERE layer = 1 AND head = 2')
        assert wide.column("v")[0].as_py() == pytest.approx(1.2)
        value = atlas.query("SELECT value FROM head_metrics LIMIT 1").schema.field("value").type
        assert str(value) == "double"  # DOUBLE, not a 32-bit REAL


def test_latest_run_wins_and_history_stays(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    old = write_shard(tmp_path / "s", _run("r-old", "2026-01-01T00:00:00+00:00"), MODEL,
                      {"head_metrics": _rows(0.0, "r-old")})
    new = write_shard(tmp_path / "s", _run("r-new", "2026-02-01T00:00:00+00:00"), MODEL,
                      {"head_metrics": _rows(5.0, "r-new")})
    with Atlas.writer(db) as atlas:
        atlas.ingest(new)
        atlas.ingest(old)
    with Atlas(db) as atlas:
        latest = atlas.query("SELECT DISTINCT run_id FROM latest_metrics").column(0).to_pylist()
        assert latest == ["r-new"]
        assert atlas.query("SELECT count(*) FROM head_metrics").column(0)[0].as_py() == 24


def test_query_refuses_writes_and_bad_sql(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    Atlas.writer(db).close()
    with Atlas(db) as atlas:
        for sql in ("DELETE FROM runs", "DROP TABLE runs", "CREATE TABLE x (a INT)",
                    "SELECT 1; DELETE FROM runs", "COPY runs TO 'x.csv'", "ATTACH 'x.db'"):
            with pytest.raises(BadInput):
                atlas.query(sql)
        with pytest.raises(BadInput, match="parse"):
            atlas.query("SELEC nonsense")


def test_missing_file_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no atlas"):
        Atlas(tmp_path / "missing.duckdb")
    foreign = tmp_path / "other.duckdb"
    duckdb.connect(str(foreign)).close()
    with pytest.raises(SchemaMismatch, match="not a head-atlas"):
        Atlas(foreign)
    text = tmp_path / "notes.duckdb"
    text.write_text("hello")
    with pytest.raises(BadInput):
        Atlas(text)


def test_other_schema_version_is_refused_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    Atlas.writer(db).close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE atlas_meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    before = db.read_bytes()
    with pytest.raises(SchemaMismatch, match="version 999"):
        Atlas.writer(db)
    assert db.read_bytes() == before


def test_reader_waits_then_says_busy(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    Atlas.writer(db).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db)!r})
        print("held", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="held by another process"):
            Atlas(db, wait_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    with Atlas(db, wait_s=5) as atlas:  # free again
        assert atlas.query("SELECT 1 AS one").column(0)[0].as_py() == 1


def test_create_statements_cover_every_table() -> None:
    ddl = "\n".join(schema.create_statements())
    for table in schema.metadata.tables:
        assert f"CREATE TABLE {table} " in ddl
