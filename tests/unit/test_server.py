"""The server's service layer in-process, on an atlas built from tiny random models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from atlas.errors import BadInput, NotFound
from atlas.pages.data import concept_heads, head_card
from atlas.server import AtlasService, BuildRequest, TimedOut, TooLarge, status_of
from tests.integration.test_server_support import add_concept_run, build_tiny_atlas
from tests.tiny import save_tiny

TABLES = ("models", "runs", "head_metrics", "concept_scores", "concepts")


@pytest.fixture(scope="module")
def atlas_db(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("server-unit") / "atlas.duckdb"
    build_tiny_atlas(db, [tiny_dir])
    add_concept_run(db)
    return db


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-data")


@pytest.fixture
def service(atlas_db: Path, data_dir: Path):
    from cli.serve import WorkerBuilder

    svc = AtlasService(atlas_db, WorkerBuilder(atlas_db, "local", None, "cpu", data_dirs=[data_dir]),
                       sql_timeout_s=1.0, max_rows=200)
    yield svc
    svc.close()


def counts(svc: AtlasService) -> dict[str, int]:
    return {t: svc.sql(f"SELECT count(*) AS n FROM {t}")["rows"][0]["n"] for t in TABLES}


@pytest.mark.parametrize("sql", [
    "DELETE FROM head_metrics",
    "INSERT INTO concepts VALUES ('x', '[]', 'y')",
    "CREATE TABLE x AS SELECT 1",
    "DROP VIEW heads",
    "SELECT 1; DELETE FROM runs",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY head_metrics TO '/tmp/leak.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM duckdb_settings()",
    "SELECT getenv('HOME')",
    "SELECT * FROM system.main.head_metrics",
    "SET threads = 1",
    "SELECT FROM WHERE",
])
def test_sql_refuses_writes_files_and_settings(service: AtlasService, sql: str) -> None:
    before = counts(service)
    with pytest.raises(BadInput) as info:
        service.sql(sql)
    assert status_of(info.value) == 400
    assert counts(service) == before


def test_sql_reads_tables_views_and_ctes(service: AtlasService) -> None:
    result = service.sql("WITH top AS (SELECT * FROM latest_metrics WHERE metric = 'patterns.induction') "
                         "SELECT h.layer, h.head, t.value FROM heads h JOIN top t USING (model_key, layer, head) "
                         "ORDER BY t.value DESC LIMIT 3")
    assert result["columns"] == ["layer", "head", "value"]
    assert len(result["rows"]) == 3
    assert [r["value"] for r in result["rows"]] == sorted((r["value"] for r in result["rows"]), reverse=True)
    assert service.sql("SELECT sum(range) AS s FROM range(10)")["rows"] == [{"s": 45}]


def test_sql_row_limit_and_time_limit(service: AtlasService) -> None:
    with pytest.raises(TooLarge) as big:
        service.sql("SELECT * FROM range(1000)")
    assert status_of(big.value) == 413
    with pytest.raises(TooLarge):  # a request cannot raise the server's limit
        service.sql("SELECT * FROM range(1000)", max_rows=10**9)
    assert len(service.sql("SELECT * FROM range(200)")["rows"]) == 200
    assert len(service.sql("SELECT * FROM range(50)", max_rows=100)["rows"]) == 50
    t0 = time.monotonic()
    with pytest.raises(TimedOut) as slow:
        service.sql("SELECT count(*) FROM range(1000000000000) a", timeout_s=0.3)
    assert time.monotonic() - t0 < 5.0
    assert status_of(slow.value) == 408
    assert service.sql("SELECT count(*) AS n FROM models")["rows"][0]["n"] >= 1  # still answers


def test_head_card_matches_the_atlas(service: AtlasService) -> None:
    with service.reader() as atlas:
        m = atlas.execute("SELECT * FROM models").to_pylist()[0]
        layer, head = m["n_layers"] - 1, m["n_heads"] - 1
        card = head_card(atlas, m["alias"] or m["model_key"], layer, head)
        values = atlas.execute("SELECT metric, value FROM latest_metrics WHERE model_key = ? AND layer = ? "
                               "AND head = ?", [m["model_key"], layer, head]).to_pylist()
        assert {r["metric"]: r["value"] for r in card["metrics"]} == {r["metric"]: r["value"] for r in values}
        for row in card["metrics"]:
            above = atlas.execute("SELECT count(*) FROM latest_metrics WHERE model_key = ? AND metric = ? "
                                  "AND value > ?", [m["model_key"], row["metric"], row["value"]]).column(0)[0]
            assert row["rank"] == above.as_py() + 1
            assert row["of"] == m["n_layers"] * m["n_heads"]
        assert card["kv_head"] == head // (m["n_heads"] // m["n_kv_heads"])
        assert {c["concept"] for c in card["concepts"]} == {"colors", "numbers"}
        with pytest.raises(NotFound):
            head_card(atlas, m["model_key"], m["n_layers"], 0)
        with pytest.raises(NotFound):
            head_card(atlas, "no-such-model", 0, 0)


def test_concept_ranking_is_the_highest_scores(service: AtlasService) -> None:
    with service.reader() as atlas:
        top = concept_heads(atlas, "colors", top=3).to_pylist()
        best = atlas.execute("SELECT max(score) FROM concept_scores WHERE concept = 'colors'").column(0)[0].as_py()
        with pytest.raises(NotFound):
            concept_heads(atlas, "no-such-concept")
    assert [r["rank"] for r in top] == [1, 2, 3]
    assert top[0]["score"] == best
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]


def test_bad_build_requests_queue_nothing(service: AtlasService, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        service.submit(BuildRequest(models=["llama"], families=["no-such-family"]))
    with pytest.raises(BadInput, match="reads the option 'n_randon'"):  # the one option validator
        service.submit(BuildRequest(models=["llama"], families=["pursuit"], options={"n_randon": 3}))
    with pytest.raises(BadInput, match="option 'verify' = 'huge'"):
        service.submit(BuildRequest(models=["llama"], families=["pursuit"], verify="huge"))
    with pytest.raises(BadInput):  # missing, or outside the data directories: one answer
        service.submit(BuildRequest(models=[str(data_dir / "missing-model")], families=["patterns"]))
    with pytest.raises(BadInput):
        service.submit(BuildRequest(models=[str(save_tiny(tmp_path / "outside", "Qwen2ForCausalLM"))],
                                    families=["patterns"]))
    assert service.builds == {}


def test_build_through_the_service_becomes_visible(service: AtlasService, data_dir: Path) -> None:
    save_tiny(data_dir / "tiny-qwen2", "Qwen2ForCausalLM", seed=1)
    before = {r["model_key"] for r in service.sql("SELECT model_key FROM models")["rows"]}
    state = service.submit(BuildRequest(models=["tiny-qwen2"], families=["patterns"]))  # relative to the data dir
    deadline = time.monotonic() + 120
    while state.status not in ("complete", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.status == "complete", state.error or state.failed_units
    assert state.planned == state.todo == state.done == 1
    assert state.ingest_windows and all(end >= start for start, end in state.ingest_windows)
    after = service.sql("SELECT model_key, n_layers, n_heads FROM models")["rows"]
    new = [r for r in after if r["model_key"] not in before]
    assert len(new) == 1
    n_metrics = service.sql("SELECT count(DISTINCT metric) AS n FROM head_metrics")["rows"][0]["n"]
    rows = service.sql(f"SELECT count(*) AS n FROM head_metrics WHERE model_key = '{new[0]['model_key']}'")
    assert rows["rows"][0]["n"] == new[0]["n_layers"] * new[0]["n_heads"] * n_metrics
