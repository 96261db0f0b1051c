"""Concept queries over a real DuckDB atlas (no torch): ranking per model, across models, the check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from atlas.concepts import concept_across_models, concept_heads, known_concepts, top_heads, verification
from atlas.errors import NotFound
from atlas.store import Atlas
from tests.seed import ingest, model_row, run_record


def _model(key: str, alias: str) -> dict:
    return model_row(key, alias, n_layers=3, n_heads=4, n_kv_heads=2)


def _ingest(db: Path, run_id: str, model: dict, finished: str, best: tuple[int, int], mass: float) -> None:
    run = run_record(run_id, model["model_key"], "pursuit", finished, probe_set="concepts:colors",
                     config={"criterion": "l1"})
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    heads.sort(key=lambda h: (h != best, h))
    scores = [{"layer": lay, "head": h, "concept": "colors", "score": 0.9 - 0.05 * i, "rank": i + 1}
              for i, (lay, h) in enumerate(heads)]
    edits = [{"edit_id": f"colors:k=1:alpha=-1:{sel}:concept_mass", "concept": "colors", "k": 1,
              "alpha": -1.0, "selection": sel, "heads": [list(best)], "metric": "concept_mass",
              "before": 0.5, "after": after}
             for sel, after in [("pursuit", mass), ("logit-lens", 0.45)] + [(f"random-{i}", 0.48 + i / 100)
                                                                             for i in range(10)]]
    ingest(db, run, model, {"concept_scores": scores, "edits": edits,
                            "concepts": [{"name": "colors", "words": ["red"], "source": "builtin"}]})


@pytest.fixture()
def atlas_path(fresh_atlas: Path) -> Path:
    a, b = _model("a@1:safetensors", "alpha"), _model("b@1:safetensors", "beta")
    _ingest(fresh_atlas, "old", a, "2026-01-01T00:00:00+00:00", (0, 0), 0.49)
    _ingest(fresh_atlas, "new", a, "2026-02-01T00:00:00+00:00", (2, 3), 0.1)
    _ingest(fresh_atlas, "other", b, "2026-01-15T00:00:00+00:00", (1, 1), 0.6)
    return fresh_atlas


def test_concept_heads_use_the_latest_run_per_model(atlas_path: Path) -> None:
    with Atlas(atlas_path) as atlas:
        assert known_concepts(atlas) == ["colors"]
        rows = concept_heads(atlas, "colors", "alpha", 3).to_pylist()
        assert next((r["layer"], r["head"], r["rank"]) for r in rows) == (2, 3, 1)
        assert rows[0]["depth"] == 1.0 and len(rows) == 3
        assert top_heads(atlas, "beta", "colors", 2)[0] == (1, 1)
        assert {r["model"] for r in concept_heads(atlas, "colors", None, 2).to_pylist()} == {"alpha", "beta"}
        with pytest.raises(NotFound, match="concepts in this atlas: colors"):
            concept_heads(atlas, "animals")


def test_verification_and_across_models(atlas_path: Path) -> None:
    with Atlas(atlas_path) as atlas:
        check = {r["model"]: r for r in verification(atlas, "colors").to_pylist()}
        across = {r["model"]: r for r in concept_across_models(atlas, "colors", 2).to_pylist()}
    assert check["alpha"]["pursuit"] == pytest.approx(0.2) and check["alpha"]["beats_every_random"] is True
    assert check["alpha"]["random_median"] == pytest.approx((0.52 + 0.53) / 2 / 0.5)
    assert check["beta"]["beats_every_random"] is False
    assert across["alpha"]["top_heads"].startswith("L2.H3") and across["beta"]["suppress_ratio"] == pytest.approx(1.2)


def test_atlas_concepts_imports_no_torch() -> None:
    assert "atlas.concepts" in sys.modules
    import subprocess

    code = "import sys, atlas.concepts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
