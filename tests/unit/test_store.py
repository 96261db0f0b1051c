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
from atlas.store import Atlas
from tests.seed import ALPHA, BETA, METRICS, head_rows, ingest, model_row, run_record

MODEL = model_row("m@abc:safetensors", "m", n_layers=3, n_heads=4, n_kv_heads=2)


def _rows(value: float) -> list[dict]:
    return head_rows("patterns.induction", MODEL, lambda layer, head: value + layer + head / 10, n=10, stderr=0.1)


def test_ingest_is_idempotent_and_views_work(tmp_path: Path) -> None:
    from atlas.shards import write_shard

    db = tmp_path / "a.duckdb"
    shard = write_shard(tmp_path / "shards", run_record("patterns-1", MODEL["model_key"]), MODEL,
                        {"head_metrics": _rows(0.0)})
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


def test_latest_run_wins_and_history_stays(fresh_atlas: Path) -> None:
    key = MODEL["model_key"]
    ingest(fresh_atlas, run_record("r-new", key, finished="2026-02-01T00:00:00+00:00"), MODEL,
           {"head_metrics": _rows(5.0)})
    ingest(fresh_atlas, run_record("r-old", key, finished="2026-01-01T00:00:00+00:00"), MODEL,
           {"head_metrics": _rows(0.0)})
    with Atlas(fresh_atlas) as atlas:
        latest = atlas.query("SELECT DISTINCT run_id FROM latest_metrics").column(0).to_pylist()
        assert latest == ["r-new"]
        assert atlas.query("SELECT count(*) FROM head_metrics").column(0)[0].as_py() == 24


def test_seeded_atlas_holds_what_tests_seed_says(seeded_atlas: Path) -> None:
    with Atlas(seeded_atlas) as atlas:
        runs = atlas.query("SELECT run_id, model_key, status, code_version, config, started_at, finished_at "
                           "FROM runs ORDER BY run_id").to_pylist()
        counts = dict(atlas.con.execute("SELECT model_key, count(*) FROM head_metrics GROUP BY 1").fetchall())
        wide = atlas.query('SELECT "patterns.prev_token" AS v FROM head_roles '
                           "WHERE model_key = 'alpha@1:safetensors' AND layer = 2 AND head = 1").to_pylist()
    assert [r["run_id"] for r in runs] == ["patterns-alpha", "patterns-beta"]
    assert all(r["status"] == "complete" and r["code_version"] == "test" for r in runs)
    assert all(r["started_at"] == r["finished_at"] and r["finished_at"].year == 2026 for r in runs)
    assert counts == {m["model_key"]: m["n_layers"] * m["n_heads"] * len(METRICS) for m in (ALPHA, BETA)}
    assert wide[0]["v"] == pytest.approx(-2.1)


def test_a_failed_run_is_recorded_without_touching_results(seeded_atlas: Path) -> None:
    failed = run_record("patterns-alpha", ALPHA["model_key"], status="failed", error="out of memory",
                        finished="2026-03-01T00:00:00+00:00")
    with Atlas.writer(seeded_atlas) as atlas:
        atlas.record_failure(failed, ALPHA)
    with Atlas(seeded_atlas) as atlas:
        run = atlas.query("SELECT status, error FROM runs WHERE run_id = 'patterns-alpha'").to_pylist()
        rows = atlas.query("SELECT count(*) AS n FROM head_metrics WHERE run_id = 'patterns-alpha'").to_pylist()
    assert run == [{"status": "failed", "error": "out of memory"}]
    assert rows[0]["n"] == 24


def test_query_refuses_writes_and_bad_sql(fresh_atlas: Path) -> None:
    with Atlas(fresh_atlas) as atlas:
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


def test_other_schema_version_is_refused_unchanged(fresh_atlas: Path) -> None:
    db = fresh_atlas
    con = duckdb.connect(str(db))
    con.execute("UPDATE atlas_meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    before = db.read_bytes()
    with pytest.raises(SchemaMismatch, match="version 999"):
        Atlas.writer(db)
    assert db.read_bytes() == before


def test_reader_waits_then_says_busy(fresh_atlas: Path) -> None:
    db = fresh_atlas
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
