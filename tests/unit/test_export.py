"""Exports: the Parquet tree reads back equal in three engines; the HeadVis tree has Neuronpedia's layout.
Also the notebook API (`atlas.open(path).heads(...)`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

import atlas
from atlas.errors import BadInput
from atlas.export import HEADVIS_METRICS, export_headvis, export_parquet
from atlas.store import Atlas
from tests.unit.test_report import add_rows, build_tiny_atlas, model_keys

NP_LOADER_KEYS = ("model_name", "dataset_name", "n_sequences", "seq_len", "dtype", "attn_implementation")


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = build_tiny_atlas(tmp_path_factory.mktemp("export"))
    key = model_keys(db)[0]
    add_rows(db, key, "lens", {"head_tokens": [
        {"layer": 1, "head": 2, "kind": "promote", "rank": r, "token_id": r, "token_text": f"w{r}", "score": 1.0 - r}
        for r in range(3)]})
    return db


def test_parquet_reads_back_in_duckdb_pyarrow_and_pandas(tiny_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    manifest = export_parquet(atlas.open(tiny_db), out)
    keys = model_keys(tiny_db)
    with Atlas(tiny_db) as a:
        expected = a.execute("SELECT model_key, run_id, layer, head, metric, value FROM head_metrics "
                             "ORDER BY ALL").to_pylist()
        n_heads = a.con.execute("SELECT count(*) FROM heads").fetchall()[0][0]
    assert manifest["tables"]["head_metrics"]["rows"] == len(expected)
    assert manifest["tables"]["heads"]["rows"] == n_heads and manifest["tables"]["head_tokens"]["rows"] == 3
    assert sorted(p.name.split("=", 1)[0] for p in (out / "head_metrics").iterdir()) == ["model_key"] * len(keys)
    con = duckdb.connect()  # a fresh engine that never saw the atlas
    got = con.execute(f"SELECT model_key, run_id, layer, head, metric, value FROM read_parquet("
                      f"'{out}/head_metrics/**/*.parquet', hive_partitioning = true) ORDER BY ALL").fetchall()
    assert [tuple(r.values()) for r in expected] == got
    table = pads.dataset(out / "head_metrics", format="parquet", partitioning="hive").to_table()
    assert sorted(set(table.column("model_key").to_pylist())) == sorted(keys)
    frame = pd.read_parquet(out / "heads")
    assert set(frame.columns) >= {"model_key", "layer", "head", "kv_head", "depth"} and len(frame) == n_heads
    assert (out / "role_thresholds" / "data_0.parquet").exists() and not (out / "concepts").exists()


def test_parquet_filters_models_and_guards_overwrite(tiny_db: Path, tmp_path: Path) -> None:
    key = model_keys(tiny_db)[1]
    with Atlas(tiny_db) as a:
        export_parquet(a, tmp_path / "pq", [key])
        with pytest.raises(BadInput, match="already holds an export"):
            export_parquet(a, tmp_path / "pq")
        manifest = export_parquet(a, tmp_path / "pq", overwrite=True)
    assert manifest["models"] == model_keys(tiny_db)
    assert len(list((tmp_path / "pq" / "models").iterdir())) == 2


def test_headvis_tree(tiny_db: Path, tmp_path: Path) -> None:
    with Atlas(tiny_db) as a:
        trees = export_headvis(a, tmp_path / "hv")
        wide = {(r["model_key"], r["layer"], r["head"]): r["value"] for r in a.execute(
            "SELECT model_key, layer, head, value FROM latest_metrics WHERE metric = 'patterns.induction'").to_pylist()}
        models = {r["model_key"]: r for r in a.execute("SELECT * FROM models").to_pylist()}
    assert sorted(trees) == model_keys(tiny_db)
    for key, tree in trees.items():
        root = Path(tree)
        assert root.parent.name == "headvis" and root.name == "head-atlas"
        config = json.loads((root / "config.json").read_text())
        assert all(config["pipeline_config"].get(k) is not None or config.get(k) is not None for k in NP_LOADER_KEYS)
        assert config["head_data_pattern"] == "L{layer}H{head}.json"
        m = models[key]
        scatter = json.loads((root / "scatter_data.json").read_text())
        assert len(scatter) == m["n_layers"] * m["n_heads"] == len(config["heads"])
        for row in scatter:
            assert row["induction_score"] == wide[(key, row["layer"], row["head"])]
            assert set(HEADVIS_METRICS) <= set(row) and row["qk_distance_variance"] is None
            head = json.loads((root / "heads" / f"L{row['layer']}H{row['head']}.json").read_text())
            assert head["metrics"]["patterns.induction"]["value"] == row["induction_score"]
            assert head["kv_head"] == row["head"] // (m["n_heads"] // m["n_kv_heads"])
        assert json.loads((root / "server_config.json").read_text()) == {}
    first = Path(trees[model_keys(tiny_db)[0]])
    head = json.loads((first / "heads" / "L1H2.json").read_text())
    assert [t["token"] for t in head["top_promote_tokens"]] == ["w0", "w1", "w2"]
    assert {"key": "top_promote_tokens", "label": "Top promote tokens"} in json.loads(
        (first / "config.json").read_text())["custom_tables"]


def test_export_cli(tiny_db: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    run = CliRunner().invoke(app, ["export", "--format", "parquet", "--out", str(tmp_path / "x"), "--json",
                                   "--db", str(tiny_db)])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["tables"]["head_metrics"]["rows"] > 0
    again = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "x"), "--db", str(tiny_db)])
    assert again.exit_code == 2
    hv = CliRunner().invoke(app, ["export", "--format", "headvis", "--out", str(tmp_path / "h"), "--db", str(tiny_db)])
    assert hv.exit_code == 0 and len(list((tmp_path / "h").iterdir())) == 2


def test_notebook_api(tiny_db: Path) -> None:
    with atlas.open(tiny_db) as nb:
        assert isinstance(nb, atlas.Atlas)
        frame = nb.heads(metric="induction")
        assert isinstance(frame, pd.DataFrame) and len(frame) == 24
        for _, per in frame.groupby("model_key"):
            assert list(per["value"]) == sorted(per["value"], reverse=True)
        top = nb.heads(metric="patterns.induction", top=2, arrow=True)
        assert isinstance(top, pa.Table) and top.num_rows == 4
        wide = nb.heads(model=model_keys(tiny_db)[0])
        assert len(wide) == 12 and "patterns.induction" in wide.columns and "kv_head" in wide.columns
        assert nb.query("SELECT 1 AS x").to_pylist() == [{"x": 1}]  # still an Atlas
        assert "patterns.prev_token" in nb.metrics() and len(nb.models()) == 2
        assert len(nb.tokens(model_keys(tiny_db)[0], 1, 2)) == 3
        assert nb.match(model_keys(tiny_db)[0], "0.1", in_=model_keys(tiny_db)[1], top=2).shape[0] == 2


def test_atlas_side_imports_no_torch() -> None:
    code = ("import sys, atlas, atlas.report, atlas.match, atlas.export, atlas.notebook; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# -- DuoAttention / KV-head labels ---------------------------------------------------------------------------
# 3 layers x 4 query heads on 2 KV heads (2 query heads each); retrieval.score per (layer, head)
RETRIEVAL = {(0, 0): 0.9, (0, 1): 0.0, (0, 2): 0.5, (0, 3): 0.5,
             (1, 0): 0.6, (1, 1): 0.6, (1, 2): 0.0, (1, 3): 0.0,
             (2, 0): 0.1, (2, 1): 0.1, (2, 2): 0.7, (2, 3): 0.0}


@pytest.fixture
def kv_db(fresh_atlas: Path) -> Path:
    from tests.seed import head_rows, ingest, model_row, run_record

    model = model_row("kv@1:safetensors", "kv", n_layers=3, n_heads=4, n_kv_heads=2)
    ingest(fresh_atlas, run_record("retrieval-kv", model["model_key"], family="retrieval"), model,
           {"head_metrics": head_rows("retrieval.score", model, lambda la, h: RETRIEVAL[(la, h)])})
    return fresh_atlas


def _full(doc: dict) -> set[tuple[int, int]]:
    return {(e["layer"], e["kv_head"]) for e in doc["kv_heads"] if e["full"]}


def test_kv_labels_aggregate_query_heads_per_kv_head(kv_db: Path) -> None:
    from atlas.export import kv_head_labels

    with Atlas(kv_db, read_only=True) as a:
        by_max = kv_head_labels(a, "kv", budget=2 / 6)  # a KV head is kept if any of its query heads retrieves
        by_mean = kv_head_labels(a, "kv", budget=2 / 6, aggregate="mean")
        none, every = kv_head_labels(a, "kv", budget=0.0), kv_head_labels(a, "kv", budget=1.0)
        half = kv_head_labels(a, "kv", budget=0.45)  # 2.7 KV heads: a budget is a cap, 2 are kept
    assert _full(by_max) == {(0, 0), (2, 1)}
    assert _full(by_mean) == {(1, 0), (0, 1)}
    assert _full(none) == set() and len(_full(every)) == 6 and half["full_kv_heads"] == 2
    first = by_max["kv_heads"][0]
    assert first["score"] == 0.9 and [q["head"] for q in first["query_heads"]] == [0, 1]


def test_duoattention_export_reads_as_duoattention_reads_it(kv_db: Path, tmp_path: Path) -> None:
    """DuoAttention's load_attn_pattern: np.loadtxt(full_attention_heads.tsv, delimiter='\\t') and
    config.json's sink_size / recent_size; its threshold 0.5 gives back our labels."""
    import numpy as np

    from atlas.export import export_duoattention

    with Atlas(kv_db, read_only=True) as a:
        written = export_duoattention(a, tmp_path / "kv", budget=2 / 6, sink=4, recent=32)
    root = Path(written["kv@1:safetensors"])
    grid = np.loadtxt(root / "full_attention_heads.tsv", dtype=float, delimiter="\t")
    assert grid.shape == (3, 2)
    assert {(int(la), int(kv)) for la, kv in zip(*np.nonzero(grid >= 0.5), strict=True)} == {(0, 0), (2, 1)}
    config = json.loads((root / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, 32)
    assert json.loads((root / "kv_heads.json").read_text())["format"] == "head-atlas kv-heads v1"


def test_duoattention_export_cli_and_its_errors(kv_db: Path, fresh_atlas: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    ok = CliRunner().invoke(app, ["export", "--format", "duoattention", "--budget", "0.5", "--out",
                                  str(tmp_path / "d"), "--json", "--db", str(kv_db)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["format"] == "duoattention"
    bad = CliRunner().invoke(app, ["export", "--format", "duoattention", "--budget", "1.5", "--out",
                                   str(tmp_path / "e"), "--db", str(kv_db)])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output
    unknown = CliRunner().invoke(app, ["export", "--format", "duoattention", "--by", "retrieval.nope", "--out",
                                       str(tmp_path / "f"), "--db", str(kv_db)])
    assert unknown.exit_code == 2 and "retrieval.nope for 0 of 12 heads" in unknown.output
