"""Head cards and --promotes on a real (tiny) lens atlas; other families' data shows up generically."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas.cards import card_json, head_card, parse_head
from atlas.errors import BadInput, NotFound
from atlas.lens_queries import rank_promoters, variants
from atlas.shards import write_shard
from atlas.store import Atlas
from cli.main import app
from tests.seed import run_record
from workers.plan import plan
from workers.unit import run_unit

runner = CliRunner()


@pytest.fixture(scope="module")
def atlas_db(tiny_lm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lens run of the tiny model, plus a made-up family's metric, token kind and concept scores."""
    db = tmp_path_factory.mktemp("cards") / "atlas.duckdb"
    units = plan([tiny_lm.source], ["lens"], {"lens_windows": 3, "lens_window": 16}, "float32")
    result = run_unit(tiny_lm, units[0], db.with_name("shards"))
    assert result.ok, result.error
    run = run_record("other-1", tiny_lm.source.key, "other", datetime.now(UTC).isoformat(), probe_set="x",
                     device="cpu", tokens=0, seconds=0.0)
    a = tiny_lm.adapter
    other = write_shard(db.with_name("shards"), run, tiny_lm.models_row(), {
        "head_metrics": [{"layer": layer, "head": head, "metric": "other.score", "value": float(layer * 10 + head),
                          "n": 1, "stderr": None} for layer in range(a.n_layers) for head in range(a.n_heads)],
        "head_tokens": [{"layer": 1, "head": 2, "kind": "pursuit", "rank": 1, "token_id": 7, "token_text": "w4",
                         "score": 0.5}],
        "concept_scores": [{"layer": 1, "head": 2, "concept": "numbers", "score": 0.25, "rank": 3}]})
    with Atlas.writer(db) as atlas:
        atlas.ingest(result.shard)
        atlas.ingest(other)
    return db


def test_parse_head() -> None:
    assert parse_head("18.6") == (18, 6) == parse_head("L18H6") == parse_head("18:6")
    with pytest.raises(BadInput):
        parse_head("eighteen")


def test_card_holds_every_family_with_ranks(atlas_db: Path, tiny_lm) -> None:
    with Atlas(atlas_db) as atlas:
        card = card_json(head_card(atlas, tiny_lm.source.name, "1.2", top=4))
    metrics = {m["metric"]: m for m in card["metrics"]}
    assert set(metrics) == {"lens.direct_effect", "lens.direct_effect_centered", "other.score"}
    n_heads = tiny_lm.adapter.n_layers * tiny_lm.adapter.n_heads
    assert metrics["other.score"]["rank"] == 6 and metrics["other.score"]["of"] == n_heads  # 13 and 20..23 are higher
    assert all(1 <= m["rank"] <= m["of"] == n_heads for m in metrics.values())
    assert set(card["tokens"]) == {"promote", "suppress", "pursuit"}
    assert [t["rank"] for t in card["tokens"]["promote"]] == [1, 2, 3, 4]
    assert card["concepts"] == [{"concept": "numbers", "score": 0.25, "rank": 3, "family": "other"}]
    assert (card["layer"], card["head"], card["kv_head"]) == (1, 2, 1)


def test_show_command(atlas_db: Path, tiny_lm) -> None:
    result = runner.invoke(app, ["show", tiny_lm.source.name, "1.2", "--db", str(atlas_db), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"]["pursuit"][0]["token_text"] == "w4"
    missing = runner.invoke(app, ["show", tiny_lm.source.name, "9.0", "--db", str(atlas_db)])
    assert missing.exit_code == NotFound.exit_code and "no head 9.0" in missing.output


def test_promotes_ranks_heads_by_their_stored_score(atlas_db: Path, tiny_lm) -> None:
    with Atlas(atlas_db) as atlas:
        top = atlas.query("SELECT token_text FROM head_tokens WHERE kind = 'promote' AND rank = 1 "
                          "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1").column(0)[0].as_py()
        want = atlas.query(f"SELECT layer, head, score FROM head_tokens WHERE kind = 'promote' "
                           f"AND token_text = '{top}' ORDER BY score DESC").to_pylist()
        got = rank_promoters(atlas, " " + top, top=100).to_pylist()  # found through its space variant
    assert [(r["layer"], r["head"]) for r in got] == [(w["layer"], w["head"]) for w in want]
    assert {r["matched"] for r in got} == {top}
    assert variants(" Paris") == [" Paris", "Paris"]
    cli = runner.invoke(app, ["heads", "--promotes", "not-a-token", "--db", str(atlas_db)])
    assert cli.exit_code == NotFound.exit_code and "several tokens" in cli.output
    both = runner.invoke(app, ["heads", "--promotes", top, "--metric", "x", "--db", str(atlas_db)])
    assert both.exit_code == BadInput.exit_code


@pytest.mark.parametrize("spec", ["18.6", "L18.H6", "L18H6", "18:6", "18/6", "l18 h6", " 18.6 ", "L18 6"])
def test_one_head_parser_reads_every_spelling(spec: str) -> None:
    """Issue 18: `atlas show llama L18.H6` failed while `atlas match` took it; `edit --heads 18.6` failed."""
    from atlas.heads import parse_heads

    assert parse_head(spec) == (18, 6)
    assert parse_heads(f"{spec},3.2") == [(18, 6), (3, 2)]


@pytest.mark.parametrize("spec", ["186", "", "a.b", "18.6.1", "L18", "18.", "H6"])
def test_one_head_parser_refuses_what_is_not_a_head(spec: str) -> None:
    with pytest.raises(BadInput):
        parse_head(spec)
