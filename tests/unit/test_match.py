"""Head matching across models: rank profiles and lens-readout overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlas.errors import BadInput, NotFound
from atlas.match import Matcher, match_all, match_head, parse_head, percentiles
from atlas.store import Atlas
from tests.unit.test_report import add_rows, build_tiny_atlas, model_keys


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_atlas(tmp_path_factory.mktemp("match"))


def test_percentiles_average_ties() -> None:
    got = percentiles(np.array([3.0, 1.0, 1.0, np.nan, 10.0]))
    assert got[:3].tolist() == [pytest.approx(2 / 3), pytest.approx(1 / 6), pytest.approx(1 / 6)]
    assert np.isnan(got[3]) and got[4] == 1.0
    assert percentiles(np.array([5.0])).tolist() == [0.5]


@pytest.mark.parametrize("spec", ["18.6", "L18.H6", "L18H6", "18:6", " l18h6 "])
def test_parse_head(spec: str) -> None:
    assert parse_head(spec) == (18, 6)


@pytest.mark.parametrize("spec", ["186", "", "a.b", "18.6.1"])
def test_parse_head_rejects(spec: str) -> None:
    with pytest.raises(BadInput):
        parse_head(spec)


def test_a_model_matched_against_itself_finds_each_head(tiny_db: Path) -> None:
    key = model_keys(tiny_db)[0]
    with Atlas(tiny_db) as atlas:
        table = match_all(atlas, key, key, top=1, by="profile").to_pylist()
        n_metrics = atlas.con.execute("SELECT count(DISTINCT metric) FROM latest_metrics WHERE model_key = ?",
                                      [key]).fetchall()[0][0]
    assert len(table) == 12 and {r["n_features"] for r in table} == {n_metrics}
    for row in table:
        assert (row["layer"], row["head"]) == (row["layer_a"], row["head_a"])
        assert row["profile"] == 1.0 and row["kv_head"] == row["kv_head_a"]


def test_profiles_compare_ranks_not_scales(tiny_db: Path) -> None:
    """Scaling every metric of model B by 10 leaves the matches unchanged (rank-normalized)."""
    a, b = model_keys(tiny_db)
    with Atlas(tiny_db) as atlas:
        matcher = Matcher(atlas, a, b)
        before = [matcher.profile(i).tolist() for i in range(len(matcher.heads_a))]
        pb = matcher.pb.copy()
    scaled = percentiles(np.nan_to_num(pb[:, 0]) * 10)
    assert scaled.tolist() == pytest.approx(pb[:, 0].tolist())
    assert all(0.0 <= v <= 1.0 for row in before for v in row)


def test_token_overlap_is_jaccard_of_normalized_text(tiny_db: Path) -> None:
    a, b = model_keys(tiny_db)
    # A's head 0.0 promotes {cat, dog, sun}; B's head 2.1 promotes {dog, sun, tree} written with
    # another tokenizer's space markers: overlap {dog, sun} / union of 4 = 0.5.
    tokens_a = [{"layer": 0, "head": 0, "kind": "promote", "rank": i, "token_id": i, "token_text": t, "score": 1.0}
                for i, t in enumerate(["Ġcat", "Ġdog", "sun"])]
    tokens_b = [{"layer": 2, "head": 1, "kind": "promote", "rank": i, "token_id": i, "token_text": t, "score": 1.0}
                for i, t in enumerate(["▁Dog", "▁sun", "tree"])]
    add_rows(tiny_db, a, "lens", {"head_tokens": tokens_a})
    add_rows(tiny_db, b, "lens", {"head_tokens": tokens_b})
    with Atlas(tiny_db) as atlas:
        rows = match_head(atlas, a, "0.0", b, top=3, by="tokens").to_pylist()
        both = match_head(atlas, a, "0.0", b, top=12, by="both").to_pylist()
    assert (rows[0]["layer"], rows[0]["head"], rows[0]["tokens"]) == (2, 1, 0.5)
    assert rows[0]["shared_tokens"] == "dog sun" and rows[1]["tokens"] == 0.0
    best = next(r for r in both if (r["layer"], r["head"]) == (2, 1))
    assert best["profile"] is not None and best["tokens"] == 0.5
    assert [r["score"] for r in both] == sorted((r["score"] for r in both), reverse=True)


def test_errors(tiny_db: Path) -> None:
    a, b = model_keys(tiny_db)
    with Atlas(tiny_db) as atlas:
        with pytest.raises(NotFound, match=r"has no head 9\.0"):
            match_head(atlas, a, "9.0", b)
        with pytest.raises(BadInput, match="--by"):
            Matcher(atlas, a, b).match(0, 0, by="vibes")


def test_cli(tiny_db: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    a, b = model_keys(tiny_db)
    result = CliRunner().invoke(app, ["match", a, "1.2", "--in", b, "--top", "4", "--json", "--db", str(tiny_db)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    every = CliRunner().invoke(app, ["match", a, "--in", b, "--by", "profile", "--format", "csv", "--db", str(tiny_db)])
    assert every.exit_code == 0 and len(every.stdout.strip().splitlines()) == 1 + 12
