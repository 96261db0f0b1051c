"""Cross-model report: the data it gathers equals the atlas, and the page it writes is offline."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from atlas.errors import BadInput, NotFound
from atlas.report import compare, figures, page_figures, parse_thresholds, render_html, summary, write_report
from atlas.store import Atlas
from tests.seed import ingest, run_record


def build_tiny_atlas(root: Path) -> Path:
    """Two tiny random models of different shape and GQA, with the real patterns family."""
    from tests.tiny import save_tiny
    from workers.build import build

    llama = save_tiny(root / "tiny-llama", "LlamaForCausalLM", seed=0)  # 3 layers x 4 heads, 2 KV
    gemma = save_tiny(root / "tiny-gemma", "Gemma3ForCausalLM", seed=1)
    db = root / "atlas.duckdb"
    report = build([str(llama), str(gemma)], ["patterns"], db, device="cpu", executor="local")
    assert not report.failed, report.failed
    return db


def model_keys(db: Path) -> list[str]:
    with Atlas(db) as atlas:
        return [r[0] for r in atlas.con.execute("SELECT model_key FROM models ORDER BY model_key").fetchall()]


def add_rows(db: Path, model_key: str, family: str, tables: dict[str, list[dict[str, Any]]],
             finished: str | None = None) -> str:
    """Ingest extra rows through the real shard + ingest path (for tables no built family writes yet)."""
    run_id = f"{family}-{abs(hash((model_key, family, finished))) % 10**8:08d}"
    with Atlas(db) as atlas:
        model = atlas.execute("SELECT * EXCLUDE (added_at) FROM models WHERE model_key = ?", [model_key]).to_pylist()[0]
    run = run_record(run_id, model_key, family, finished or datetime.now(UTC).isoformat(),
                     config={"corpus_id": "c0ffee"}, code_version="0")
    ingest(db, run, model, tables, db.parent / "extra_shards")
    return run_id


def concept_rows(db: Path, key: str, concept: str, metric: str) -> list[dict[str, Any]]:
    """Concept scores that follow one stored metric, so the expected order is known from the atlas."""
    with Atlas(db) as atlas:
        vals = atlas.execute("SELECT layer, head, value FROM latest_metrics WHERE model_key = ? AND metric = ? "
                             "ORDER BY value DESC, layer, head", [key, metric]).to_pylist()
    return [{"layer": v["layer"], "head": v["head"], "concept": concept, "score": v["value"], "rank": i + 1}
            for i, v in enumerate(vals)]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = build_tiny_atlas(tmp_path_factory.mktemp("report"))
    for key in model_keys(db):
        add_rows(db, key, "pursuit", {"concepts": [{"name": "numbers", "words": ["one", "two"], "source": "test"}],
                                      "concept_scores": concept_rows(db, key, "numbers", "patterns.prev_token")})
    return db


def test_grids_depth_and_gqa_equal_the_atlas(tiny_db: Path) -> None:
    with Atlas(tiny_db) as atlas:
        data = compare(atlas)
        stored = atlas.execute("SELECT model_key, metric, layer, head, value FROM latest_metrics").to_pylist()
        views = {(r["model_key"], r["layer"], r["head"]): r
                 for r in atlas.execute("SELECT * FROM heads").to_pylist()}
    assert len(data["models"]) == 2 and data["metrics"]
    assert len(stored) == sum(m["n_layers"] * m["n_heads"] for m in data["models"]) * len(data["metrics"])
    for row in stored:
        assert data["grids"][row["model_key"]][row["metric"]]["values"][row["layer"]][row["head"]] == row["value"]
    by_key = {m["model_key"]: m for m in data["models"]}
    for per in data["top_heads"].values():
        for key, heads in per.items():
            values = [h["value"] for h in heads]
            assert values == sorted(values, reverse=True)
            for h in heads:
                view = views[(key, h["layer"], h["head"])]
                assert h["kv_head"] == view["kv_head"]  # GQA as the `heads` view defines it
                assert h["depth"] == pytest.approx(view["depth"])
                assert h["depth"] == pytest.approx(h["layer"] / (by_key[key]["n_layers"] - 1))
    assert {m["group"] for m in data["models"]} == {2}  # tiny configs: 4 query heads, 2 KV heads


def test_role_counts_follow_thresholds(tiny_db: Path) -> None:
    with Atlas(tiny_db) as atlas:
        data = compare(atlas)
        for role in data["roles"]:
            for key, counts in role["counts"].items():
                expected = atlas.con.execute(
                    "SELECT count(*) FROM head_labels WHERE model_key = ? AND metric = ?",
                    [key, role["metric"]]).fetchall()[0][0]
                assert counts["count"] == expected
        values = [v for per in data["grids"].values() for row in per["patterns.induction"]["values"] for v in row]
        median = sorted(values)[len(values) // 2]
        lowered = compare(atlas, thresholds={"induction": median})
    role = next(r for r in lowered["roles"] if r["metric"] == "patterns.induction")
    assert role["overridden"] and role["threshold"] == median and role["default_threshold"] == 0.4
    assert sum(c["count"] for c in role["counts"].values()) == sum(v > median for v in values)


def test_concept_tables_and_provenance(tiny_db: Path) -> None:
    with Atlas(tiny_db) as atlas:
        data = compare(atlas, metrics=["prev_token"], concepts=["numbers"], top=3)
        with pytest.raises(NotFound, match="no concept scores for colours"):
            compare(atlas, concepts=["colours"])
    (concept,) = data["concepts"]
    assert concept["words"] == ["one", "two"]
    for key, entry in concept["models"].items():
        top_prev = data["top_heads"]["patterns.prev_token"][key]
        assert [(h["layer"], h["head"]) for h in entry["top"]] == [(h["layer"], h["head"]) for h in top_prev]
    families = {r["family"] for r in data["runs"]}
    assert families == {"patterns", "pursuit"}
    assert all(r["config"] for r in data["runs"])
    assert any(r["corpus"] == {"corpus_id": "c0ffee"} for r in data["runs"])


def test_bad_input() -> None:
    assert parse_thresholds(["patterns.induction=0.25"]) == {"patterns.induction": 0.25}
    for bad in (["induction"], ["=0.2"], ["induction=high"]):
        with pytest.raises(BadInput):
            parse_thresholds(bad)


def test_unknown_model_and_metric(tiny_db: Path) -> None:
    with Atlas(tiny_db) as atlas:
        with pytest.raises(NotFound, match="no model 'nope'"):
            compare(atlas, ["nope"])
        with pytest.raises(NotFound, match="no metric"):
            compare(atlas, metrics=["nonsense"])


def test_html_is_self_contained(tiny_db: Path, tmp_path: Path) -> None:
    with Atlas(tiny_db) as atlas:
        data = compare(atlas)
    out = write_report(data, tmp_path / "report.html")
    page = out.read_text()
    assert page.count("plotly.js v") == 1  # the library's banner: inlined exactly once
    assert not re.search(r"<script[^>]+src=", page) and not re.search(r"<link[^>]+href=", page)
    assert "connect-src 'none'" in page  # the CSP blocks any fetch the page might still try
    figs = json.loads(re.search(r'id="atlas-figures">(.*?)</script>', page, re.S).group(1))
    assert figs == json.loads(json.dumps(page_figures(figures(data))))
    embedded = json.loads(re.search(r'id="atlas-data">(.*?)</script>', page, re.S).group(1))
    keys = [m["model_key"] for m in data["models"]]
    for mi, metric in enumerate(data["metrics"]):
        for i, key in enumerate(keys):
            # the values are embedded once, in the grids the page draws the heatmap from
            assert "z" not in figs[f"heat-{mi}-{i}"]["data"][0]
            assert embedded["grids"][key][metric] == data["grids"][key][metric]["values"]
            assert [m["model_key"] for m in embedded["models"]][i] == key and embedded["metrics"][mi] == metric
            assert f'id="heat-{mi}-{i}"' in page
        assert f'id="depth-{mi}"' in page
    for run in data["runs"]:
        assert run["run_id"] in page
    assert render_html(data).count('<script type="application/json" id="atlas-figures">') == 1


def test_summary_and_cli(tiny_db: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["compare", "--db", str(tiny_db), "--metric", "induction,prev_token",
                                      "--threshold", "induction=0.1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["metrics"] == ["patterns.induction", "patterns.prev_token"] and out.exists()
    with Atlas(tiny_db) as atlas:
        assert got == {**summary(compare(atlas, metrics=["induction", "prev_token"],
                                         thresholds={"induction": 0.1})), "report": str(out)}
    text = CliRunner().invoke(app, ["compare", "--db", str(tiny_db), "--out", str(out)])
    assert text.exit_code == 0 and "KV heads" in text.stdout and "runs behind these numbers" in text.stdout
    bad = CliRunner().invoke(app, ["compare", "nope", "--db", str(tiny_db), "--out", str(out)])
    assert bad.exit_code == 3


def test_circuits_section_when_the_family_was_built(tmp_path: Path) -> None:
    """With a circuits run, the report carries circuit_predictions for that model, and the page shows
    one row per prediction; without one (the tiny_db atlas) the section is absent."""
    from atlas.circuits import circuit_predictions
    from tests.tiny import save_tiny
    from workers.build import build

    model = save_tiny(tmp_path / "tiny-llama", "LlamaForCausalLM", seed=0)
    db = tmp_path / "atlas.duckdb"
    report = build([str(model)], ["patterns", "circuits"], db, device="cpu", executor="local",
                   options={"circuits_positions": 32})
    assert not report.failed, report.failed
    with Atlas(db) as atlas:
        data = compare(atlas)
        expected = circuit_predictions(atlas, data["models"][0]["model_key"])
    assert expected and data["circuits"] == {data["models"][0]["model_key"]: expected}
    html = render_html(data)
    assert html.count('<tr class="circuit"') == len(expected)


def test_no_circuits_section_without_the_family(tiny_db: Path) -> None:
    with Atlas(tiny_db) as atlas:
        data = compare(atlas)
    assert data["circuits"] == {} and 'id="circuits-table"' not in render_html(data)
