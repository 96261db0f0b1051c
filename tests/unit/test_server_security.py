"""Issue 15: the attacks on `atlas serve`, as tests. Each must fail with a 4xx JSON error, read
nothing it should not, and leave the atlas as it was.

The server runs in-process (FastAPI's TestClient, server errors turned into responses, as a real
server would send them) on an atlas built from a tiny random model. Secret files sit next to the
atlas; every SQL attack names them and must never return their marker.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from atlas.server import AtlasService, create_app
from tests.integration.test_server_support import add_concept_run, build_tiny_atlas

MARKER = "TOPSECRET7731"
TABLES = ("models", "runs", "head_metrics", "concept_scores", "concepts", "head_tokens")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the server can read but must never publish: CSV, JSON, Parquet, gzip, nested for globs."""
    root = tmp_path_factory.mktemp("secrets")
    (root / "s.csv").write_text(f"k,v\nkey,{MARKER}\n")
    (root / "s.json").write_text(json.dumps([{"k": MARKER}]))
    (root / "s.txt").write_text(f"{MARKER}\n")
    pq.write_table(pa.table({"k": [MARKER]}), root / "s.parquet")
    with gzip.open(root / "s.csv.gz", "wt") as handle:
        handle.write(f"k\n{MARKER}\n")
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "t.csv").write_text(f"k\n{MARKER}\n")
    return root


@pytest.fixture(scope="module")
def atlas_db(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("security") / "atlas.duckdb"
    build_tiny_atlas(db, [tiny_dir])
    add_concept_run(db)
    return db


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory the operator allows builds to read."""
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    (root / "planets.txt").write_text("mercury\nvenus\nmars\n")
    return root


@pytest.fixture(scope="module")
def service(atlas_db: Path, data_dir: Path) -> Iterator[AtlasService]:
    from cli.serve import WorkerBuilder

    svc = AtlasService(atlas_db, WorkerBuilder(atlas_db, "local", None, "cpu", data_dirs=[data_dir]),
                       sql_timeout_s=2.0, max_rows=500, max_bytes=1 << 20)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def http(service: AtlasService) -> Iterator[TestClient]:
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def counts(http: TestClient) -> dict[str, int]:
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in TABLES)
    response = http.post("/api/sql", json={"sql": sql})
    assert response.status_code == 200, response.text
    return {r["t"]: r["n"] for r in response.json()["rows"]}


def assert_error(response: Any, status: int | tuple[int, ...]) -> dict[str, Any]:
    """A JSON {error, message, hint} error with the status, no traceback, no secret, no server path."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    body = response.json()
    assert set(body) >= {"error", "message", "hint"}, body
    text = response.text
    assert MARKER not in text
    assert "Traceback" not in text and 'File "' not in text and ".py" not in text, text
    return body


# -- 1. SQL isolation: every item fails with 400 and reads nothing -------------------------------
SQL_ATTACKS = [
    # file table functions
    "SELECT * FROM read_csv('{s}/s.csv')",
    "SELECT * FROM read_csv_auto('{s}/s.csv')",
    "SELECT * FROM read_json('{s}/s.json')",
    "SELECT * FROM read_json_auto('{s}/s.json')",
    "SELECT * FROM read_parquet('{s}/s.parquet')",
    "SELECT * FROM parquet_scan('{s}/s.parquet')",
    "SELECT * FROM parquet_metadata('{s}/s.parquet')",
    "SELECT * FROM read_text('{s}/s.txt')",
    "SELECT * FROM read_blob('{s}/s.txt')",
    "SELECT * FROM sniff_csv('{s}/s.csv')",
    "SELECT * FROM read_csv('{s}/s.csv.gz')",
    "SELECT * FROM read_csv(['{s}/s.csv', '{s}/s.csv'])",
    # file literals and globs
    "SELECT * FROM '{s}/s.csv'",
    "SELECT * FROM \"{s}/s.csv\"",
    "SELECT * FROM '{s}/s.json'",
    "SELECT * FROM '{s}/s.parquet'",
    "SELECT * FROM '{s}/s.csv.gz'",
    "SELECT * FROM '{s}/**/*.csv'",
    "SELECT * FROM read_csv('{s}/**/*.csv')",
    "SELECT * FROM glob('{s}/**')",
    "SELECT * FROM 'file://{s}/s.csv'",
    "FROM '{s}/s.csv'",
    # CTE scoping: a CTE named after the path in one scope, the path read as a table in another
    "SELECT * FROM (WITH \"{s}/s.csv\" AS (SELECT 1 AS x) SELECT x FROM \"{s}/s.csv\") a, \"{s}/s.csv\" b",
    "WITH a AS (SELECT * FROM \"{s}/s.csv\"), \"{s}/s.csv\" AS (SELECT 1 AS x) SELECT * FROM a",
    "WITH \"{s}/s.csv\" AS (SELECT * FROM \"{s}/s.csv\") SELECT * FROM \"{s}/s.csv\"",
    "SELECT (WITH \"{s}/s.parquet\" AS (SELECT 1) SELECT 1), * FROM \"{s}/s.parquet\"",
    "SELECT * FROM range(1) WHERE EXISTS (WITH \"{s}/s.csv.gz\" AS (SELECT 1) SELECT 1) "
    "UNION ALL SELECT * FROM \"{s}/s.csv.gz\"",
    "SELECT * FROM (WITH duckdb_settings AS (SELECT 1) SELECT 1), duckdb_settings",
    "SELECT * FROM (WITH duckdb_databases AS (SELECT 1) SELECT 1), duckdb_databases",
    # quoting and comment tricks
    "SELECT * FROM read_csv(/* x */ '{s}/s.csv')",
    "SeLeCt * FrOm ReAd_CsV('{s}/s.csv')",
    "SELECT * FROM \"read_csv\"('{s}/s.csv')",
    "SELECT * FROM read_csv($${s}/s.csv$$)",
    "SELECT * FROM read_csv($q${s}/s.csv$q$)",
    "SELECT * FROM read_text('{s}/s.txt') -- just a comment",
    "SELECT * FROM range(1), LATERAL (SELECT * FROM read_text('{s}/s.txt'))",
    "SELECT (SELECT content FROM read_text('{s}/s.txt'))",
    "SELECT * FROM query('SELECT * FROM read_csv(''{s}/s.csv'')')",
    "SELECT * FROM query_table('\"{s}/s.csv\"')",
    "SELECT * FROM main.read_csv('{s}/s.csv')",
    # settings, secrets, environment
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "SELECT current_setting('enable_external_access')",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM duckdb_secrets()",
    "SELECT getenv('HOME')",
    "CALL enable_logging()",
    # other databases, files written, extensions
    "ATTACH '{s}/other.duckdb' AS other",
    "ATTACH ':memory:' AS other",
    "DETACH atlas",
    "COPY head_metrics TO '{s}/leak.csv'",
    "COPY (SELECT 1) TO '{s}/leak.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{s}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{s}/evil.duckdb_extension'",
    # http(s) and object stores
    "SELECT * FROM 'https://example.com/x.csv'",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    # writes, including DML inside a CTE (the statement's type is SELECT)
    "WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (UPDATE head_metrics SET value = 0 RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (INSERT INTO concepts VALUES ('evil', '[]', 'x') RETURNING *) SELECT * FROM x",
    "DELETE FROM head_metrics",
    "SELECT 1; DELETE FROM runs",
    "CREATE TABLE x AS SELECT 1",
    "SELECT * FROM system.main.head_metrics",
]


@pytest.mark.parametrize("attack", SQL_ATTACKS)
def test_sql_attack_fails_with_400_and_reads_nothing(http: TestClient, secrets: Path, attack: str) -> None:
    before = counts(http)
    body = assert_error(http.post("/api/sql", json={"sql": attack.format(s=secrets)}), 400)
    assert str(secrets) not in body["hint"]
    assert counts(http) == before
    assert not (secrets / "leak.csv").exists() and not (secrets / "leak.parquet").exists()
    assert not (secrets / "export").exists() and not (secrets / "other.duckdb").exists()


def test_the_engine_refuses_files_even_past_the_friendly_checks(service: AtlasService, secrets: Path) -> None:
    """The text checks are only early messages: on the serving instance itself DuckDB refuses."""
    import duckdb

    with service.reader() as atlas:
        for sql in (f"SELECT * FROM read_csv('{secrets}/s.csv')", f"SELECT * FROM '{secrets}/s.parquet'",
                    f"SELECT * FROM glob('{secrets}/**')", "INSTALL httpfs", "SET threads = 1",
                    "SET enable_external_access = true"):
            with pytest.raises(duckdb.Error):
                atlas.con.execute(sql).fetchall()


def test_legitimate_sql_still_answers(http: TestClient) -> None:
    sql = ("WITH top AS (SELECT * FROM latest_metrics WHERE metric = 'patterns.induction') "
           "SELECT h.layer, h.head, t.value FROM heads h JOIN top t USING (model_key, layer, head) "
           "ORDER BY t.value DESC LIMIT 3")
    response = http.post("/api/sql", json={"sql": sql})
    assert response.status_code == 200, response.text
    assert len(response.json()["rows"]) == 3
    recursive = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) AS s FROM r"
    assert http.post("/api/sql", json={"sql": recursive}).json()["rows"] == [{"s": 15}]
