"""The real `atlas serve` in a subprocess on loopback, driven with httpx: queries, the CLI's
--server mode, bad requests, and a build on Ray with readers hammering the server meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_server_support import add_concept_run, build_tiny_atlas, serve, wait_build
from tests.tiny import save_tiny

ATLAS = [sys.executable, "-c", "from cli.main import main; main()"]
pytestmark = pytest.mark.slow  # a real `atlas serve` process per module: the slow set, out of `make check`


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ATLAS, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny atlas, the CLI's local answers taken before the server holds the file, the server."""
    db = tmp_path_factory.mktemp("server") / "atlas.duckdb"
    build_tiny_atlas(db, [tiny_dir])
    add_concept_run(db)
    local = {
        "heads": cli("heads", "--metric", "induction", "--top", "4", "--db", str(db), "--json"),
        "query": cli("query", "SELECT metric, count(*) AS n FROM head_metrics GROUP BY 1 ORDER BY 1",
                     "--db", str(db), "--json"),
        "models": cli("models", "--db", str(db), "--json"),
    }
    data = tmp_path_factory.mktemp("served-data")  # the only place submitted builds may read
    with serve(db, "--executor", "ray", "--max-rows", "500", "--sql-timeout", "2", "--data-dir", str(data)) as url:
        yield {"url": url, "db": db, "local": local, "data": data}


def test_reads_answer_like_the_local_cli(server: dict[str, Any]) -> None:
    url, db = server["url"], server["db"]
    for name, args in {"heads": ["heads", "--metric", "induction", "--top", "4"],
                       "query": ["query", "SELECT metric, count(*) AS n FROM head_metrics GROUP BY 1 ORDER BY 1"],
                       "models": ["models"]}.items():
        remote = cli(*args, "--server", url, "--json")
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == json.loads(server["local"][name].stdout), name
    # a CLI build on the served file fails at once, with the reason
    blocked = cli("build", "--model", "llama", "--families", "patterns", "--db", str(db), "--executor", "local")
    assert blocked.returncode == 4 and "another build" in blocked.stderr


def test_api_reads(server: dict[str, Any]) -> None:
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        models = http.get("/api/models").json()
        assert len(models) == 1
        key = models[0]["model_key"]
        ranked = http.get("/api/heads", params={"metric": "patterns.induction", "top": 3}).json()
        assert [r["rank"] for r in ranked] == [1, 2, 3]
        assert ranked[0]["value"] >= ranked[1]["value"] >= ranked[2]["value"]
        card = http.get(f"/api/heads/{key}/{ranked[0]['layer']}/{ranked[0]['head']}").json()
        induction = next(m for m in card["metrics"] if m["metric"] == "patterns.induction")
        assert induction["value"] == ranked[0]["value"] and induction["rank"] == 1
        by_concept = http.get("/api/heads", params={"concept": "colors", "top": 2}).json()
        assert [r["rank"] for r in by_concept] == [1, 2]
        matches = http.get(f"/api/match/{key}/{ranked[0]['layer']}/{ranked[0]['head']}",
                           params={"in": key, "top": 2}).json()
        assert (matches[0]["layer"], matches[0]["head"]) == (ranked[0]["layer"], ranked[0]["head"])  # itself
        report = http.get("/api/compare", params={"models": [key], "metrics": ["induction"], "top": 3}).json()
        assert report["metrics"] == ["patterns.induction"]
        spec = http.get("/openapi.json").json()
        assert {"/api/sql", "/api/builds", "/api/builds/{build_id}", "/api/heads", "/api/compare"} <= set(spec["paths"])


def test_bad_requests_get_4xx_and_change_nothing(server: dict[str, Any]) -> None:
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        def snapshot() -> list[Any]:
            sql = ("SELECT (SELECT count(*) FROM head_metrics) AS m, (SELECT count(*) FROM runs) AS r, "
                   "(SELECT count(*) FROM models) AS n")
            return [http.post("/api/sql", json={"sql": sql}).json()["rows"], len(http.get("/api/builds").json())]

        before = snapshot()
        key = http.get("/api/models").json()[0]["model_key"]
        cases = [
            (http.post("/api/sql", json={"sql": "DELETE FROM head_metrics"}), 400),
            (http.post("/api/sql", json={"sql": "DROP TABLE runs"}), 400),
            (http.post("/api/sql", json={"sql": "SELECT * FROM read_parquet('/etc/*')"}), 400),
            (http.post("/api/sql", json={"sql": "SELECT count(*) FROM range(1000000000000)"}), 408),
            (http.post("/api/sql", json={"sql": "SELECT * FROM range(501)"}), 413),
            (http.post("/api/sql", json={"query": "SELECT 1"}), 422),
            (http.get("/api/heads/no-such-model/0/0"), 404),
            (http.get(f"/api/heads/{key}/999/0"), 404),
            (http.get("/api/heads", params={"metric": "no-such-metric"}), 404),
            (http.get("/api/builds/nope"), 404),
            (http.post("/api/builds", json={"families": ["patterns"]}), 422),
            (http.post("/api/builds", json={"models": "llama"}), 422),
            (http.post("/api/builds", json={"models": ["llama"], "unknown_option": 1}), 422),
            (http.post("/api/builds", json={"models": ["llama"], "families": ["no-such-family"]}), 400),
            (http.post("/api/builds", content=b"{not json", headers={"content-type": "application/json"}), 422),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert response.json().get("message") or response.json().get("detail")
        assert snapshot() == before
        remote = cli("query", "DELETE FROM runs", "--server", server["url"])
        assert remote.returncode == 2 and "only read queries" in remote.stderr


def _reader(url: str, key: str, stop: threading.Event, log: list[tuple[float, int, Any]]) -> None:
    """Read head cards, rankings and the new model's row count until told to stop."""
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while not stop.is_set():
            i += 1
            t = time.time()
            if i % 3 == 0:
                r = http.get("/api/heads", params={"metric": "induction", "top": 5})
                log.append((t, r.status_code, None))
            elif i % 3 == 1:
                r = http.get(f"/api/heads/{key}/{i % 3}/{i % 4}")
                log.append((t, r.status_code, None))
            else:
                r = http.post("/api/sql", json={"sql": "SELECT model_key, count(*) AS n FROM head_metrics "
                                                       "GROUP BY 1 ORDER BY 1"})
                log.append((t, r.status_code, r.json()["rows"] if r.status_code == 200 else r.text))


@pytest.mark.slow
@pytest.mark.ray
def test_build_on_ray_completes_while_readers_get_answers(server: dict[str, Any], tmp_path: Path) -> None:
    url = server["url"]
    save_tiny(server["data"] / "tiny-gpt2", "GPT2LMHeadModel", seed=3)
    with httpx.Client(base_url=url, timeout=60) as http:
        key = http.get("/api/models").json()[0]["model_key"]
        stop, log = threading.Event(), []
        readers = [threading.Thread(target=_reader, args=(url, key, stop, log)) for _ in range(4)]
        for t in readers:
            t.start()
        try:
            outside = http.post("/api/builds", json={"models": [str(tmp_path)], "families": ["patterns"]})
            assert outside.status_code == 400, outside.text  # not under --data-dir
            submitted = http.post("/api/builds", json={"models": ["tiny-gpt2"], "families": ["patterns"]})
            assert submitted.status_code == 202, submitted.text
            state = wait_build(http, submitted.json()["id"])
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert state["status"] == "complete", state
        assert state["planned"] == state["todo"] == state["done"] == 1
        models = {m["model_key"]: m for m in http.get("/api/models").json()}
        assert len(models) == 2
        new_key = next(k for k in models if k != key)
        assert http.get("/api/heads", params={"metric": "induction", "model": new_key}).json()
        card = http.get(f"/api/heads/{new_key}/0/0").json()
        assert card["metrics"] and card["model_key"] == new_key
    assert log and all(status == 200 for _, status, _ in log), [e for e in log if e[1] != 200][:3]
    during = [e for e in log if state["started_at"] <= e[0] <= state["finished_at"]]
    assert len(during) >= 8, "readers should have been answered while the build ran"
    # every reader saw the new model's unit whole or not at all (ingest is one transaction)
    full = models[new_key]["n_layers"] * models[new_key]["n_heads"] * len(card["metrics"])
    seen = {row["n"] for _, _, rows in log if rows for row in rows if row["model_key"] == new_key}
    assert seen <= {full}, seen


def test_issue_15_attacks_over_http(server: dict[str, Any], tmp_path: Path) -> None:
    """The issue's attacks against the real server, on one keep-alive connection: each refused with a
    JSON error, nothing read, the connection never reset, the atlas unchanged."""
    import os

    from tests.unit.test_cli_bad_files import bad_models

    data: Path = server["data"]
    secret = tmp_path / "secret.csv"
    secret.write_text("k\nTOPSECRET7731\n")
    os.mkfifo(data / "fifo.txt")
    (data / "a-dir").mkdir()
    bad_models(data / "models") if not (data / "models").exists() else None
    with httpx.Client(base_url=server["url"], timeout=60) as http:
        before = http.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM runs"}).json()
        key = http.get("/api/models").json()[0]["model_key"]
        cte = (f'SELECT * FROM (WITH "{secret}" AS (SELECT 1 AS x) SELECT x FROM "{secret}") a, "{secret}" b')
        cases = [
            (http.post("/api/builds", json={"models": ["llama"], "families": ["pursuit"],
                                            "concepts": ["/proc/self/environ"]}), (400, 404)),
            (http.post("/api/sql", json={"sql": cte}), (400,)),
            (http.post("/api/sql", json={"sql": f"SELECT * FROM read_csv('{data}/**/*.csv')"}), (400,)),
            (http.post("/api/sql", json={"sql": "WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x"}), (400,)),
            (http.post("/api/builds", json={"models": ["llama"], "families": ["lens"], "corpus": "/dev/zero"}), (400,)),
            (http.post("/api/builds", json={"models": ["llama"], "families": ["lens"], "corpus": "fifo.txt"}), (400,)),
            (http.post("/api/builds", json={"models": ["llama"], "families": ["lens"], "corpus": "a-dir"}), (400,)),
            (http.post("/api/sql", json={"sql": "SELECT repeat('x', 1000000) FROM range(2000)"}), (408, 413)),
            (http.get("/metric/patterns.induction", params={"top": "1e30"}), (400,)),
            (http.get(f"/api/match/{key}/0/0", params={"in": key, "top": -1}), (400,)),
            (http.get("/api/heads", params={"metric": "induction", "model": "%"}), (404,)),
            (http.post("/api/builds", json={"models": ["models/not-utf8"], "families": ["patterns"]}), (400,)),
            (http.post("/api/builds", json={"models": ["models/type.gguf"], "families": ["patterns"]}), (400,)),
        ]
        for response, statuses in cases:
            assert response.status_code in statuses, (response.request.url, response.text[:300])
            body = response.json()
            assert set(body) >= {"error", "message", "hint"} and "TOPSECRET7731" not in response.text
            assert "Traceback" not in response.text
        odd = http.post("/api/sql", json={"sql": "SELECT 'x'::BLOB AS b, 'infinity'::DATE AS d"})
        assert odd.status_code == 200 and odd.json()["rows"] == [{"b": "x", "d": "infinity"}]
        health = http.get("/api/health")
        assert health.status_code == 200 and str(server["db"].parent) not in health.text
        assert http.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM runs"}).json() == before
