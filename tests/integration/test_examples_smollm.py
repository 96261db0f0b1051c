"""The examples family on the embedded SmolLM2, built as `atlas build` builds it (in-process executor):
every head gets its examples, and what the literature predicts of previous-token heads (Olsson et al.
2022; Elhage et al. 2021) shows in them: in their top max_attention contexts the largest weight to a
non-BOS key falls on the key just before the query, far more often than for layer-matched random heads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from atlas.examples import head_examples
from atlas.store import Atlas
from workers.build import build

pytestmark = pytest.mark.slow

TOP = 10  # heads with the highest patterns.prev_token


def _peak_is_previous(example: dict) -> bool:
    """The key (first window position excluded: it is BOS) with the largest weight is the query's previous token."""
    q, row = example["query_pos"], example["attention"]
    first = 1 if example["source_pos"] == q else 0  # the stored list starts at the window's BOS
    keys = range(first, q + 1)
    return max(keys, key=lambda k: row[k]) == q - 1


def test_previous_token_heads_peak_on_the_previous_token(tmp_path: Path) -> None:
    db = tmp_path / "atlas.duckdb"
    report = build(["llama"], ["patterns", "examples"], db, executor="local", device="cpu")
    assert len(report.completed) == 2 and not report.failed
    with Atlas(db, read_only=True) as atlas:
        key, n_layers, n_heads = atlas.con.execute("SELECT model_key, n_layers, n_heads FROM models").fetchall()[0]
        stored = atlas.con.execute("SELECT count(DISTINCT (layer, head)), count(*) FROM head_examples").fetchall()
        assert stored == [(n_layers * n_heads, n_layers * n_heads * 2 * 5)]
        ranked = atlas.con.execute("SELECT layer, head FROM latest_metrics WHERE metric = 'patterns.prev_token' "
                                   "ORDER BY value DESC, layer, head").fetchall()
        top = ranked[:TOP]
        rng = random.Random(0)  # per top head, another head of its layer that is not a top head
        matched = [(layer, rng.choice([h for h in range(n_heads) if (layer, h) not in top])) for layer, _ in top]

        def share(heads: list[tuple[int, int]]) -> float:
            hits = [_peak_is_previous(e) for layer, head in heads
                    for e in head_examples(atlas, key, layer, head)["max_attention"]]
            return sum(hits) / len(hits)

        top_share, random_share = share(top), share(matched)
        seconds = dict(atlas.con.execute("SELECT family, seconds FROM runs").fetchall())
    print(f"seconds: examples {seconds['examples']:.1f}, patterns {seconds['patterns']:.1f} (same build)")
    print(f"peak on q-1 in max_attention examples: top-{TOP} previous-token heads {top_share:.2f}, "
          f"layer-matched random heads {random_share:.2f}")
    assert top_share >= 0.7
    assert top_share >= random_share + 0.3
