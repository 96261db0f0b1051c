"""Issue 15: the attacks on `atlas serve`, as tests. Each must fail with a 4xx JSON error, read
nothing it should not, and leave the atlas as it was.

The server runs in-process (FastAPI's TestClient, server errors turned into responses, as a real
server would send them) on an atlas built from a tiny random model. Secret files sit next to the
atlas; every SQL attack names them and must never return their marker.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
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

    class ChecksOnly(WorkerBuilder):
        """The real checks; a build that gets through them is recorded, never run (CPU is shared)."""

        def run(self, request: dict[str, Any], open_writer: Any, progress: Any) -> dict[str, Any]:
            return {"not run": True}

    svc = AtlasService(atlas_db, ChecksOnly(atlas_db, "local", None, "cpu", data_dirs=[data_dir]),
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


def test_sql_attacks_fail_in_the_engine_too(service: AtlasService) -> None:
    """A write hidden in a CTE has statement type SELECT; the READ ONLY transaction refuses it."""
    import duckdb

    with service.reader() as atlas, pytest.raises(duckdb.Error):
        atlas.con.execute("WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x").fetchall()


# -- 2. builds read only what the operator allowed ------------------------------------------------
def submit(http: TestClient, **body: Any) -> Any:
    return http.post("/api/builds", json={"models": ["llama"], "families": ["pursuit"], **body})


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{MARKER}\nsecond\n")
    return secret


def build_attacks(data_dir: Path, outside: Path) -> list[dict[str, Any]]:
    escape = data_dir / "escape.txt"
    if not escape.is_symlink():
        escape.symlink_to(outside)
    (data_dir / "linked").mkdir(exist_ok=True)
    if not (data_dir / "linked" / "config.json").is_symlink():
        (data_dir / "linked" / "config.json").symlink_to(outside)
    return [
        {"concepts": ["/proc/self/environ"]},
        {"concepts": ["env=/proc/self/environ"]},
        {"concepts": [f"x={outside}"]},
        {"concepts": [str(outside)]},
        {"concepts": ["x=../" + outside.parent.name + "/secret.txt"]},
        {"concepts": ["x=escape.txt"]},
        {"concepts": [f"x={data_dir}/../{outside.parent.name}/secret.txt"]},
        {"corpus": "/proc/self/environ"},
        {"corpus": "/dev/zero"},
        {"corpus": str(outside)},
        {"corpus": "escape.txt"},
        {"corpus": "../" + outside.parent.name + "/secret.txt"},
        {"corpus": "~/.bashrc"},
        {"corpus": "etc/passwd"},
        {"corpus": ["corpus.txt", str(outside)]},  # a corpus grid: every corpus is checked
        {"options": {"corpus": str(outside)}},  # files named in options are checked as the fields are
        {"options": {"concepts": [f"x={outside}"]}},
        {"options": {"concepts": f"colors,x={outside}"}},
        {"models": [str(outside.parent)]},
        {"models": ["/etc"]},
        {"models": ["linked"]},
        {"models": ["../" + outside.parent.name]},
    ]


def test_build_paths_stay_under_the_data_dirs(http: TestClient, service: AtlasService, data_dir: Path,
                                              outside: Path) -> None:
    before = counts(http)
    for attack in build_attacks(data_dir, outside):
        t0 = time.monotonic()
        body = assert_error(submit(http, **attack), (400, 404))
        assert time.monotonic() - t0 < 30, attack
        assert str(outside.parent) not in json.dumps(body), (attack, body)
    assert service.builds == {}
    assert counts(http) == before
    concepts = http.get("/api/concepts").json()
    assert MARKER not in json.dumps(concepts)


def test_fifo_and_device_never_block_a_request_thread(http: TestClient, service: AtlasService,
                                                      data_dir: Path) -> None:
    """40 submissions naming a FIFO at once: each refused at once, and health answers meanwhile."""
    fifo = data_dir / "pipe.txt"
    if not fifo.exists():
        os.mkfifo(fifo)
    statuses: list[int] = []

    def one() -> None:
        statuses.append(submit(http, corpus="pipe.txt", families=["lens"]).status_code)

    threads = [threading.Thread(target=one) for _ in range(40)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    assert http.get("/api/health").status_code == 200
    for t in threads:
        t.join(timeout=120)
    assert sorted(set(statuses)) <= [400, 429] and 400 in statuses, statuses
    assert time.monotonic() - t0 < 120
    assert service.builds == {}
    assert_error(submit(http, corpus="/dev/zero", families=["lens"]), 400)


def test_builds_take_criterion_verify_and_options(http: TestClient, service: AtlasService, data_dir: Path) -> None:
    """Issue 18: POST /api/builds could not set criterion, verify or any `-o` option."""
    response = submit(http, criterion="l2", verify="off", options={"n_random": 3, "readout_atoms": 5,
                                                                   "corpus": "corpus.txt"})
    assert response.status_code == 202, response.text
    request = response.json()["request"]
    assert (request["criterion"], request["verify"]) == ("l2", "off")
    assert request["options"] == {"n_random": 3, "readout_atoms": 5}
    assert request["corpus"] == str((data_dir / "corpus.txt").resolve())  # moved to its field, by real path
    assert request["families"] == ["pursuit"] and request["units"] == 1
    deadline = time.monotonic() + 30
    while service.build(response.json()["id"]).status not in ("complete", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    service.builds.clear()


@pytest.mark.parametrize(("body", "message"), [
    ({"options": {"n_randon": 3}}, "reads the option 'n_randon'"),
    ({"verify": "huge"}, "option 'verify' = 'huge' is not one of small, standard, full, off"),
    ({"options": {"verify": "huge"}}, "option 'verify' = 'huge'"),
    ({"criterion": "l3"}, "option 'criterion' = 'l3'"),
    ({"options": {"n_random": -1}}, "option 'n_random' = -1 is out of range"),
    ({"options": {"readout_atoms": "many"}}, "option 'readout_atoms' = 'many' is not an integer"),
    ({"seed": 2**40}, "option 'seed'"),
    ({"verify": "off", "options": {"verify": "full"}}, "option 'verify' is given twice"),
    ({"families": ["patterns"], "ablation": "mean"}, "reads the option 'ablation'"),
])
def test_bad_build_options_are_400_json_and_queue_nothing(http: TestClient, service: AtlasService,
                                                          body: dict[str, Any], message: str) -> None:
    """The server's options go through the one validator (workers.options.validate), as the CLI's do."""
    error = assert_error(submit(http, **body), 400)
    assert message in error["message"], error
    assert service.builds == {}


def test_allowed_files_resolve_to_real_paths(service: AtlasService, data_dir: Path) -> None:
    checked = service.builder.validate({"models": ["llama"], "families": ["lens"], "corpus": "corpus.txt",
                                        "concepts": ["planets.txt", "colors", "fruit=apple/pear"]})
    assert checked["corpus"] == str((data_dir / "corpus.txt").resolve())
    assert checked["concepts"] == [str((data_dir / "planets.txt").resolve()), "colors", "fruit=apple/pear"]


def test_file_size_cap(service: AtlasService, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from atlas.errors import BadInput

    monkeypatch.setenv("ATLAS_MAX_FILE_MB", "0.001")
    with pytest.raises(BadInput, match="over the limit"):
        service.builder.validate({"models": ["llama"], "families": ["lens"], "corpus": "corpus.txt"})


def test_models_from_data_dirs_and_broken_ones(http: TestClient, data_dir: Path) -> None:
    from tests.unit.test_cli_bad_files import BAD, bad_models

    root = data_dir / "models"
    if not root.exists():
        root.mkdir()
        bad_models(root)
    for name in BAD:
        target = {"gguf-truncated": "cut.gguf", "gguf-bad-magic": "magic.gguf", "gguf-huge-string": "huge.gguf",
                  "gguf-huge-array": "array.gguf", "gguf-bad-type": "type.gguf", "gguf-unknown-kind": "kind.gguf",
                  "gguf-is-a-dir": "dir.gguf"}.get(name, name)
        assert_error(submit(http, models=[f"models/{target}"], families=["patterns"]), 400)


# -- 3. bounded responses, validated parameters, JSON errors --------------------------------------
def test_result_byte_limit(http: TestClient) -> None:
    body = assert_error(http.post("/api/sql", json={"sql": "SELECT repeat('x', 100000) AS s FROM range(200)"}), 413)
    assert "MiB" in body["message"]
    assert http.post("/api/sql", json={"sql": "SELECT repeat('x', 1000) AS s FROM range(200)"}).status_code == 200


def test_slow_sql_is_stopped(http: TestClient) -> None:
    t0 = time.monotonic()
    assert_error(http.post("/api/sql", json={"sql": "SELECT count(*) FROM range(1000000000000) a",
                                              "timeout_s": 0.5}), 408)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("sql", [
    "SELECT 'abc'::BLOB AS b, '\\xff\\x00'::BLOB AS c",
    "SELECT 'infinity'::DATE AS d, '-infinity'::TIMESTAMP AS t, now() AS n, '12:00'::TIME AS tm",
    "SELECT INTERVAL 3 DAY AS i, uuid() AS u, 170141183460469231731687303715884105727::HUGEINT AS h",
    "SELECT 1.25::DECIMAL(10, 2) AS x, MAP {'a': 1} AS m, {'b': 'x'::BLOB} AS s, ['a'::BLOB] AS l",
    "SELECT 'nan'::DOUBLE AS n, 'inf'::DOUBLE AS i, [1, 2] AS l, {'k': 1} AS s",
])
def test_odd_types_come_back_as_json(http: TestClient, sql: str) -> None:
    response = http.post("/api/sql", json={"sql": sql})
    assert response.status_code == 200, response.text
    assert response.json()["rows"]


@pytest.mark.parametrize("path", [
    "/metric/patterns.induction?top=1e30", "/metric/patterns.induction?top=-1", "/concept/colors?top=0",
    "/api/heads?metric=induction&top=1e30", "/api/heads?metric=induction&top=-5",
    "/api/heads?metric=induction&top=99999999999999999999999", "/api/compare?top=-1",
    "/api/heads/x/99999999999999999999/0", "/api/heads?metric=induction&ascending=maybe",
])
def test_numeric_parameters_are_checked(http: TestClient, path: str) -> None:
    assert_error(http.get(path), 400)


def test_match_top_is_checked(http: TestClient) -> None:
    key = http.get("/api/models").json()[0]["model_key"]
    assert_error(http.get(f"/api/match/{key}/0/0", params={"in": key, "top": -1}), 400)
    assert len(http.get(f"/api/match/{key}/0/0", params={"in": key, "top": 2}).json()) == 2


@pytest.mark.parametrize("model", ["%", "_", "%25", "tiny%", "t_ny-llama"])
def test_model_names_match_exactly(http: TestClient, model: str) -> None:
    assert_error(http.get("/api/heads", params={"metric": "induction", "model": model}), 404)
    assert_error(http.get(f"/api/heads/{model}/0/0"), 404)
    assert_error(http.get(f"/api/match/{model}/0/0", params={"in": model}), 404)


def test_no_server_paths(http: TestClient, service: AtlasService) -> None:
    health = http.get("/api/health")
    assert health.status_code == 200 and str(service.db.parent) not in health.text
    assert str(service.db.parent) not in http.get("/").text
    missing = assert_error(http.get("/api/heads", params={"metric": "no-such-metric"}), 404)
    assert str(service.db.parent) not in json.dumps(missing)
    assert_error(http.get("/api/no/such/route/x"), 404)
    assert_error(http.delete("/api/builds"), 405)
    assert_error(http.post("/api/sql", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_failed_builds_show_no_traceback(http: TestClient, service: AtlasService,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        def validate(self, request: dict[str, Any]) -> dict[str, Any]:
            return request

        def run(self, request: dict[str, Any], open_writer: Any, progress: Any) -> dict[str, Any]:
            progress("unit", type("R", (), {"ok": False, "run_id": "u1", "error":
                                            'Traceback (most recent call last):\n  File "/srv/x/y.py", line 3\n'
                                            "RuntimeError: bad weights in /srv/secret/model.bin"})())
            raise RuntimeError(f"boom in {Path(__file__)}")

    monkeypatch.setattr(service, "builder", Exploding())
    state = submit(http).json()
    deadline = time.monotonic() + 30
    while (state := http.get(f"/api/builds/{state['id']}").json())["status"] not in ("complete", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = json.dumps(state)
    assert state["status"] == "failed" and "Traceback" not in text and ".py" not in text and "/srv" not in text
    assert "bad weights" in state["failed_units"]["u1"]
    service.builds.clear()


# -- 4. tokens ------------------------------------------------------------------------------------
def test_tokens(service: AtlasService) -> None:
    with TestClient(create_app(service, token="read-me", build_token="build-me"),
                    raise_server_exceptions=False) as http:
        assert_error(http.get("/api/health"), 401)
        assert_error(http.get("/api/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.get("/", headers={"Authorization": "Basic read-me"}), 401)
        read = {"Authorization": "Bearer read-me"}
        assert http.get("/api/models", headers=read).status_code == 200
        assert http.post("/api/sql", json={"sql": "SELECT 1 AS x"}, headers=read).status_code == 200
        assert_error(http.post("/api/builds", json={"models": ["llama"]}, headers=read), 403)
        assert_error(http.post("/api/builds", json={"models": ["llama"]}), 401)
        builds = {"Authorization": "Bearer build-me"}
        assert_error(http.post("/api/builds", json={"models": ["llama"], "families": ["nope"]}, headers=builds), 400)
    with TestClient(create_app(service, token="only"), raise_server_exceptions=False) as http:
        assert_error(http.post("/api/builds", json={"models": ["llama"]}), 401)
        assert_error(http.post("/api/builds", json={"models": ["llama"], "families": ["nope"]},
                           headers={"Authorization": "Bearer only"}), 400)


def test_client_sends_the_token(service: AtlasService, monkeypatch: pytest.MonkeyPatch) -> None:
    from atlas.client import Client
    from atlas.errors import AtlasError

    app = create_app(service, token="sesame")
    with TestClient(app) as http:
        monkeypatch.setenv("ATLAS_TOKEN", "sesame")
        client = Client("http://testserver")
        client.http = http
        client.http.headers.update(client.auth_headers())
        assert client.list_models().num_rows >= 1
        monkeypatch.setenv("ATLAS_TOKEN", "wrong")
        bad = Client("http://testserver")
        bad.http = TestClient(app)
        bad.http.headers.update(bad.auth_headers())
        with pytest.raises(AtlasError, match="token"):
            bad.list_models()


def test_non_loopback_needs_a_token(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "a.duckdb")],
                                env={"ATLAS_TOKEN": ""})
    assert result.exit_code == 2, result.output
    assert "without --token" in result.output
    assert not (tmp_path / "a.duckdb").exists()


def test_an_unexpected_error_is_json_and_logged(http: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from atlas import queries

    def broken(atlas: Any) -> Any:
        raise RuntimeError(f"bug near {Path(__file__)}")

    monkeypatch.setattr(queries, "list_models", broken)
    with caplog.at_level("ERROR", logger="atlas.server"):
        body = assert_error(http.get("/api/models"), 500)
    assert body["error"] == "InternalError"
    assert "bug near" in caplog.text  # the traceback is in the server's log, not the answer
    assert http.get("/api/health").status_code == 200


def test_request_bodies_are_bounded(http: TestClient) -> None:
    assert_error(http.post("/api/sql", json={"sql": "SELECT 1 -- " + "x" * (2 << 20)}), 413)
    assert_error(http.post("/api/builds", json={"models": ["x" * 100_000] * 20}), 413)


def test_deeply_nested_sql_is_refused_not_crashed(http: TestClient) -> None:
    assert_error(http.post("/api/sql", json={"sql": "SELECT 1" + " + 1" * 500}), 400)
    nested = "SELECT * FROM " + "(SELECT * FROM " * 900 + "range(1)" + ")" * 900
    assert_error(http.post("/api/sql", json={"sql": nested}), 400)


def test_bad_limits_create_no_atlas(tmp_path: Path) -> None:
    from atlas.errors import BadInput

    with pytest.raises(BadInput, match="memory_limit"):
        AtlasService(tmp_path / "new.duckdb", memory_limit="lots")
    assert not (tmp_path / "new.duckdb").exists()
