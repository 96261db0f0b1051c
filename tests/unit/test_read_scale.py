"""Reads that do not scan history (issue 20): the derived tables the writer keeps at ingest answer as the
history does, version 1 files keep opening and answering, and the read queries read the derived tables."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from atlas import schema
from atlas.queries import rank_heads, role_summary
from atlas.store import Atlas
from tests.seed import ALPHA, BETA, head_rows, ingest, model_row, run_record

LATEST_COLUMNS = "run_id, model_key, layer, head, metric, value, n, stderr, rank, \"of\""

# What version 1 wrote (atlas/schema.py before issue 20): views computed from the history on every query.
V1_VIEWS = {
    "latest_metrics": """
        SELECT hm.* FROM head_metrics hm JOIN runs r USING (run_id)
        WHERE r.status = 'complete'
        QUALIFY row_number() OVER (
            PARTITION BY hm.model_key, hm.metric, hm.layer, hm.head ORDER BY r.finished_at DESC) = 1""",
    "heads": schema.heads_select(),
    "head_labels": """
        SELECT lm.model_key, lm.layer, lm.head, t.label, lm.metric, lm.value, t.threshold
        FROM latest_metrics lm JOIN role_thresholds t USING (metric)
        WHERE lm.value > t.threshold""",
}


# Version 1 left a tie on finished_at to scan order; version 2 gives it to the larger run_id.
V1_TIES_BROKEN = V1_VIEWS["latest_metrics"].replace("ORDER BY r.finished_at DESC", "ORDER BY r.finished_at DESC, "
                                                                                  "hm.run_id DESC")


def v1_head_roles(metric_ids: list[str]) -> str:
    cols = ", ".join(f"'{m}'" for m in sorted(metric_ids))
    return (f"CREATE OR REPLACE VIEW head_roles AS SELECT h.*, p.* EXCLUDE (model_key, layer, head) FROM heads h "
            f"LEFT JOIN (PIVOT (SELECT model_key, layer, head, metric, value FROM latest_metrics) ON metric IN "
            f"({cols}) USING first(value) GROUP BY model_key, layer, head) p USING (model_key, layer, head)")


def downgrade_to_v1(db: Path) -> None:
    """Turn a version 2 file into what version 1 wrote for the same rows: no derived tables, the old views."""
    con = duckdb.connect(str(db))
    metrics = [r[0] for r in con.execute("SELECT DISTINCT metric FROM head_metrics ORDER BY 1").fetchall()]
    for view in ("head_roles", "head_labels", "latest_metrics", "heads"):
        con.execute(f"DROP VIEW {view}")
    for table in schema.DERIVED_TABLES:
        con.execute(f"DROP TABLE {table}")
    for name, body in V1_VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {body}")
    con.execute(v1_head_roles(metrics))
    con.execute("UPDATE atlas_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()


def history(db: Path) -> Path:
    """Runs that make "latest" matter: an older run ingested after a newer one, a newer run without some
    heads, a failed re-record of a complete run, a re-ingest that drops a metric, a second model."""
    key = ALPHA["model_key"]
    metric = "patterns.induction"
    ingest(db, run_record("new", key, finished="2026-03-01T00:00:00+00:00"), ALPHA,
           {"head_metrics": head_rows(metric, ALPHA, lambda la, h: 10 + la + h / 10)})
    ingest(db, run_record("old", key, finished="2026-01-01T00:00:00+00:00"), ALPHA,
           {"head_metrics": [*head_rows(metric, ALPHA), *head_rows("patterns.prev_token", ALPHA)]})
    partial = [r for r in head_rows(metric, ALPHA, lambda la, h: 20 - la) if r["layer"] < 2]
    ingest(db, run_record("newest-partial", key, finished="2026-04-01T00:00:00+00:00"), ALPHA,
           {"head_metrics": partial})
    ingest(db, run_record("ties", key, finished="2026-04-01T00:00:00+00:00"), ALPHA,  # same time: run_id decides
           {"head_metrics": head_rows("patterns.bos_sink", ALPHA, lambda la, h: (la * h) % 3)})
    ingest(db, run_record("ties-b", key, finished="2026-04-01T00:00:00+00:00"), ALPHA,
           {"head_metrics": head_rows("patterns.bos_sink", ALPHA, lambda la, h: 5.0)})
    ingest(db, run_record("beta", BETA["model_key"]), BETA, {"head_metrics": head_rows(metric, BETA)})
    ingest(db, run_record("dropped", BETA["model_key"], finished="2026-05-01T00:00:00+00:00"), BETA,
           {"head_metrics": [*head_rows(metric, BETA, lambda la, h: -1.0), *head_rows("lens.x", BETA)]})
    ingest(db, run_record("dropped", BETA["model_key"], finished="2026-05-01T00:00:00+00:00"), BETA,
           {"head_metrics": head_rows("lens.x", BETA, lambda la, h: 7.0)})  # the re-ingest has no induction
    with Atlas.writer(db) as atlas:
        atlas.record_failure(run_record("new", key, status="failed", error="oom",
                                        finished="2026-03-01T00:00:00+00:00"), ALPHA)
    return db


def from_history(atlas: Atlas) -> list[tuple]:
    return atlas.con.execute(f"SELECT {LATEST_COLUMNS} FROM ({schema.latest_select()}) ORDER BY ALL").fetchall()


def kept(atlas: Atlas) -> list[tuple]:
    return atlas.con.execute(f"SELECT {LATEST_COLUMNS} FROM latest_head_metrics ORDER BY ALL").fetchall()


def test_the_latest_table_kept_at_ingest_is_the_history_recomputed(fresh_atlas: Path) -> None:
    db = history(fresh_atlas)
    with Atlas(db) as atlas:
        expected = from_history(atlas)
        assert kept(atlas) == expected
        rows = {(r[1], r[4], r[2], r[3]): r for r in expected}
    alpha = ALPHA["model_key"]
    # "new" failed: the partial newest run wins where it has rows, "old" elsewhere
    assert rows[(alpha, "patterns.induction", 0, 0)][0] == "newest-partial"
    assert rows[(alpha, "patterns.induction", 2, 3)][0] == "old"
    assert rows[(alpha, "patterns.bos_sink", 1, 1)][0] == "ties-b"  # the larger run_id on a tie
    assert {r[0] for r in expected if r[1] == BETA["model_key"] and r[4] == "patterns.induction"} == {"beta"}
    with Atlas.writer(db) as atlas:
        before = kept(atlas)
        atlas.rebuild_derived()
        assert kept(atlas) == before


def test_head_roles_is_the_version_1_pivot(fresh_atlas: Path) -> None:
    db = history(fresh_atlas)
    with Atlas(db) as atlas:
        now = atlas.query("SELECT * FROM head_roles ORDER BY model_key, layer, head")
        metrics = [r[0] for r in atlas.metric_ids()]
        atlas.con.execute(v1_head_roles(metrics).replace("CREATE OR REPLACE VIEW head_roles",
                                                         "CREATE TEMP VIEW v1_roles")
                          .replace("FROM latest_metrics", "FROM (" + V1_TIES_BROKEN + ")")
                          .replace("FROM heads h", "FROM (" + V1_VIEWS["heads"] + ") h"))
        then = atlas.query("SELECT * FROM v1_roles ORDER BY model_key, layer, head")
    assert now.schema == then.schema
    assert now.to_pylist() == then.to_pylist()
    assert "lens.x" in now.column_names and now.num_rows == 3 * 4 + 2 * 2


def test_rank_heads_reads_the_stored_ranks_as_the_window_did(fresh_atlas: Path) -> None:
    db = history(fresh_atlas)
    with Atlas(db) as atlas:
        for ascending in (False, True):
            order = "ASC" if ascending else "DESC"
            expected = atlas.con.execute(f"""
                SELECT model_key, layer, head, value, rank FROM (
                    SELECT l.*, rank() OVER (PARTITION BY l.model_key ORDER BY l.value {order}) AS rank
                    FROM ({V1_TIES_BROKEN}) l WHERE metric = 'patterns.induction')
                WHERE rank <= 3 ORDER BY model_key, rank, layer, head""").fetchall()
            got = rank_heads(atlas, "induction", None, 3, ascending)
            assert [(r["model_key"], r["layer"], r["head"], r["value"], r["rank"]) for r in got.to_pylist()] == expected
            assert got.schema.field("kv_head").type == got.schema.field("rank").type  # BIGINT, as the view's


def test_a_version_1_file_answers_read_only_unchanged_and_migrates_in_the_writer(fresh_atlas: Path) -> None:
    db = history(fresh_atlas)
    with Atlas(db) as atlas:
        want_rank = rank_heads(atlas, "induction", None, 5).to_pylist()
        want_roles = atlas.query("SELECT * FROM head_roles ORDER BY model_key, layer, head").to_pylist()
        want_summary = role_summary(atlas).to_pylist()
        want_latest = kept(atlas)
    downgrade_to_v1(db)
    before = db.read_bytes()
    with Atlas(db) as atlas:  # read-only: TEMP views over the history, nothing written
        assert rank_heads(atlas, "induction", None, 5).to_pylist() == want_rank
        assert atlas.query("SELECT * FROM head_roles ORDER BY model_key, layer, head").to_pylist() == want_roles
        assert role_summary(atlas).to_pylist() == want_summary
        assert kept(atlas) == want_latest
    assert db.read_bytes() == before
    with Atlas.writer(db) as atlas:  # the single writer migrates, once
        version = atlas.con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()
        assert version == [(str(schema.SCHEMA_VERSION),)]
    with Atlas(db) as atlas:
        assert atlas.con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'latest_head_metrics' "
                                 "AND NOT temporary").fetchall() == [(1,)]
        assert kept(atlas) == want_latest
        assert rank_heads(atlas, "induction", None, 5).to_pylist() == want_rank
        assert atlas.query("SELECT * FROM head_roles ORDER BY model_key, layer, head").to_pylist() == want_roles
    third = model_row("gamma@1:safetensors", "gamma", n_layers=2, n_heads=3, n_kv_heads=1)
    ingest(db, run_record("gamma", third["model_key"]), third,  # and ingests keep it current from there
           {"head_metrics": head_rows("patterns.entropy", third)})
    with Atlas(db) as atlas:
        assert kept(atlas) == from_history(atlas)
        assert [r[0] for r in atlas.metric_ids()] == ["lens.x", "patterns.bos_sink", "patterns.entropy",
                                                      "patterns.induction", "patterns.prev_token"]
        assert atlas.query('SELECT count("patterns.entropy") AS n FROM head_roles').column(0)[0].as_py() == 6


def test_the_two_version_constants_agree() -> None:
    import atlas.store

    assert atlas.store.SCHEMA_VERSION == schema.SCHEMA_VERSION
    assert atlas.store.READABLE_VERSIONS == schema.READABLE_VERSIONS


def test_the_notebook_top_default_is_the_reports() -> None:
    from atlas import notebook, report

    assert notebook.REPORT_TOP_K == report.TOP_K


def test_an_arrow_shard_table_is_checked_column_wise(tmp_path: Path) -> None:
    import pyarrow as pa

    from atlas.shards import checked_arrow

    run = run_record("r", "m@1")
    table = pa.table({"layer": [0, 1], "head": [0, 0], "metric": ["a.b", "a.b"], "value": [0.5, 1.0]})
    checked = checked_arrow("head_metrics", table, run)
    assert checked is not None and checked.column("run_id").to_pylist() == ["r", "r"]
    assert checked.schema == schema.arrow_schema("head_metrics")
    with pytest.raises(ValueError, match="required column value"):
        checked_arrow("head_metrics", table.drop_columns(["value"]), run)
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        checked_arrow("head_metrics", table.append_column("colour", pa.array(["x", "y"])), run)
    with pytest.raises(ValueError, match="not the run's model_key"):
        checked_arrow("head_metrics", table.append_column("model_key", pa.array(["m@1", "other"])), run)
    with pytest.raises(ValueError, match="does not fit int32"):
        checked_arrow("head_metrics", table.set_column(0, "layer", pa.array([0, 2**40])), run)
    assert checked_arrow("head_metrics", table.set_column(3, "value", pa.array([True, False])), run) is None


def test_role_summary_is_the_version_1_count_and_top_heads(fresh_atlas: Path) -> None:
    db = history(fresh_atlas)
    with Atlas(db) as atlas:
        got = role_summary(atlas, top=3).to_pylist()
        roles = atlas.con.execute("SELECT metric, threshold, label FROM role_thresholds ORDER BY metric").fetchall()
        expected = []
        for metric, threshold, label in roles:  # as version 1 computed it, in Python over latest_metrics
            rows = atlas.con.execute("SELECT model_key, layer, head, value FROM latest_metrics WHERE metric = ? "
                                     "ORDER BY model_key, value DESC, layer, head", [metric]).fetchall()
            for key in dict.fromkeys(r[0] for r in rows):
                heads = [r for r in rows if r[0] == key]
                expected.append({"role": label, "metric": metric, "threshold": threshold, "model_key": key,
                                 "heads_above": sum(r[3] > threshold for r in heads), "of": len(heads),
                                 "top_heads": ", ".join(f"{r[1]}.{r[2]} ({r[3]:.2f})" for r in heads[:3])})
    assert got == expected
    assert {r["metric"] for r in got} == {"patterns.induction", "patterns.prev_token", "patterns.bos_sink"}


# The head card's query before the per-head latest tables (version 2): one head's rows of a history table
# from the newest complete run per kind / concept, computed from the history on every card.
V2_CARD_ROWS = """
    SELECT * EXCLUDE (newest) FROM (
        SELECT t.*, r.family, dense_rank() OVER (PARTITION BY t.{group} ORDER BY r.finished_at DESC) AS newest
        FROM {table} t JOIN runs r ON r.run_id = t.run_id
        WHERE r.status = 'complete' AND t.model_key = ? AND t.layer = ? AND t.head = ?)
    WHERE newest = 1"""


def token_rows(model: dict, kind: str, base: int) -> list[dict]:
    return [{"layer": la, "head": h, "kind": kind, "rank": rank, "token_id": base + rank,
             "token_text": f" t{base + rank}", "score": float(base - rank)}
            for la in range(model["n_layers"]) for h in range(model["n_heads"]) for rank in (1, 2)]


def concept_rows(model: dict, concept: str, value: float) -> list[dict]:
    return [{"layer": la, "head": h, "concept": concept, "score": value + la - h / 10, "rank": 1 + la * 10 + h}
            for la in range(model["n_layers"]) for h in range(model["n_heads"])]


def test_the_per_head_tables_kept_at_ingest_answer_as_the_history_did(fresh_atlas: Path) -> None:
    """latest_head_tokens / latest_concept_scores after late, partial, failed and re-ingested runs equal
    the version 2 card's per-head query over the history, and a rebuild from the history."""
    db, key = fresh_atlas, ALPHA["model_key"]
    ingest(db, run_record("lens-new", key, finished="2026-03-01T00:00:00+00:00"), ALPHA,
           {"head_tokens": token_rows(ALPHA, "promote", 100)})
    ingest(db, run_record("lens-old", key, finished="2026-01-01T00:00:00+00:00"), ALPHA,  # older, ingested late
           {"head_tokens": [*token_rows(ALPHA, "promote", 200), *token_rows(ALPHA, "suppress", 300)]})
    ingest(db, run_record("pursuit", key), ALPHA, {"concept_scores": concept_rows(ALPHA, "colors", 1.0)})
    partial = [r for r in concept_rows(ALPHA, "colors", 5.0) if r["layer"] == 0]
    ingest(db, run_record("pursuit-partial", key, finished="2026-06-01T00:00:00+00:00"), ALPHA,
           {"concept_scores": [*partial, *concept_rows(ALPHA, "months", 2.0)]})
    ingest(db, run_record("lens-b", BETA["model_key"]), BETA, {"head_tokens": token_rows(BETA, "promote", 400)})
    ingest(db, run_record("pursuit-partial", key, finished="2026-06-01T00:00:00+00:00"), ALPHA,  # re-ingest: no months
           {"concept_scores": partial})
    with Atlas.writer(db) as atlas:
        atlas.record_failure(run_record("lens-new", key, status="failed", error="oom",
                                        finished="2026-03-01T00:00:00+00:00"), ALPHA)

    def per_head(atlas: Atlas, table: str, group: str, columns: str) -> list[tuple]:
        got, want = [], []
        for model in (ALPHA, BETA):
            model_id = atlas.con.execute("SELECT model_id FROM model_ids WHERE model_key = ?",
                                         [model["model_key"]]).fetchall()[0][0]
            for la in range(model["n_layers"]):
                for h in range(model["n_heads"]):
                    got += atlas.con.execute(f"SELECT {columns} FROM latest_{table} WHERE model_id = ? "
                                             "AND layer = ? AND head = ? ORDER BY ALL", [model_id, la, h]).fetchall()
                    old_card = V2_CARD_ROWS.format(table=table, group=group)
                    want += atlas.con.execute(f"SELECT {columns} FROM ({old_card}) ORDER BY ALL",
                                              [model["model_key"], la, h]).fetchall()
        assert got == want
        return got

    tokens_cols = "run_id, model_key, layer, head, kind, rank, token_id, token_text, score, family"
    concept_cols = "run_id, model_key, layer, head, concept, score, rank, family"
    with Atlas.writer(db) as atlas:
        tokens = per_head(atlas, "head_tokens", "kind", tokens_cols)
        concepts = per_head(atlas, "concept_scores", "concept", concept_cols)
        assert {r[0] for r in tokens if r[1] == key} == {"lens-old"}  # lens-new failed after it was ingested
        assert {(r[0], r[2]) for r in concepts} == {("pursuit-partial", 0), ("pursuit", 1), ("pursuit", 2)}
        assert not [r for r in concepts if r[4] == "months"]  # the re-ingest dropped them
        ids = atlas.con.execute("SELECT * FROM model_ids ORDER BY model_id").fetchall()
        assert ids == [(key, 1), (BETA["model_key"], 2)]  # in order of first ingest
        atlas.rebuild_derived()
        assert per_head(atlas, "head_tokens", "kind", tokens_cols) == tokens
        assert per_head(atlas, "concept_scores", "concept", concept_cols) == concepts


def downgrade_to_v2(db: Path) -> None:
    """What version 2 wrote for the same rows: no model_ids, no per-head token / concept tables, no model_id."""
    con = duckdb.connect(str(db))
    for table in ("model_ids", "latest_head_tokens", "latest_concept_scores"):
        con.execute(f"DROP TABLE {table}")
    con.execute("ALTER TABLE latest_head_metrics DROP COLUMN model_id")
    con.execute("UPDATE atlas_meta SET value = '2' WHERE key = 'schema_version'")
    con.close()


def test_a_version_2_file_shows_the_same_card_read_only_and_migrates_in_the_writer(fresh_atlas: Path) -> None:
    from atlas.cards import card_json, head_card

    db = history(fresh_atlas)
    ingest(db, run_record("lens", ALPHA["model_key"]), ALPHA, {"head_tokens": token_rows(ALPHA, "promote", 100),
                                                              "concept_scores": concept_rows(ALPHA, "colors", 1.0)})
    with Atlas(db) as atlas:
        want = [card_json(head_card(atlas, "alpha", f"{la}.{h}")) for la in range(3) for h in range(4)]
    downgrade_to_v2(db)
    before = db.read_bytes()
    with Atlas(db) as atlas:  # read-only: TEMP views over the history, nothing written
        assert [card_json(head_card(atlas, "alpha", f"{la}.{h}")) for la in range(3) for h in range(4)] == want
    assert db.read_bytes() == before
    with Atlas.writer(db):
        pass
    with Atlas(db) as atlas:
        assert atlas.con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall() == [("3",)]
        assert [card_json(head_card(atlas, "alpha", f"{la}.{h}")) for la in range(3) for h in range(4)] == want
