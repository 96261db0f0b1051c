"""Cross-model consistency (atlas.consistency): planted roles are found, unrelated ones are not,
the null is the right null, and the leave-one-out profile never sees the property it tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atlas.consistency import _bh, consistency
from atlas.report import compare, model_infos
from atlas.store import Atlas
from tests.seed import ingest, model_row, run_record

SHAPES = {"a": (8, 4), "b": (6, 5), "c": (10, 3)}
OTHERS = [f"patterns.other{i}" for i in range(6)]


def _build(db: Path, planted: bool, seed: int = 0, noise_features: int = 0) -> None:
    """Three models. planted: induction peaks at depth ~0.5 and every other metric follows it (plus
    noise), so depth, profile and recovery agree across models; else every value is independent noise.
    noise_features: that many more metrics of another family, independent noise in every model, plus a
    circuits-style partner index and a metric with one value for every head."""
    rng = np.random.default_rng(seed)
    for alias, (n_layers, n_heads) in SHAPES.items():
        model = model_row(f"{alias}@1:safetensors", alias, n_layers=n_layers, n_heads=n_heads, n_kv_heads=1)
        depth = np.repeat(np.arange(n_layers) / (n_layers - 1), n_heads)
        if planted:
            role = np.exp(-((depth - 0.5) ** 2) / 0.005) * rng.uniform(0.5, 1.0, depth.size)
        else:
            role = rng.uniform(size=depth.size)
        metrics = {"patterns.induction": role}
        for name in OTHERS:
            metrics[name] = (role + 0.1 * rng.normal(size=depth.size)) if planted else rng.uniform(size=depth.size)
        for i in range(noise_features):
            metrics[f"pursuit.noise{i}"] = rng.uniform(size=depth.size)
        if noise_features:
            metrics["circuits.k_comp_partner_head"] = rng.integers(0, n_heads, size=depth.size).astype(float)
            metrics["retrieval.tests_kept"] = np.full(depth.size, 30.0)
        rows = [{"layer": int(i // n_heads), "head": int(i % n_heads), "metric": m, "value": float(v[i]), "n": 10}
                for m, v in metrics.items() for i in range(depth.size)]
        ingest(db, run_record(f"patterns-{alias}", model["model_key"]), model, {"head_metrics": rows})


def _entry(db: Path, **kw: Any) -> dict[str, Any]:
    with Atlas(db) as atlas:
        infos = model_infos(atlas, ["a", "b", "c"])
        entries = consistency(atlas, infos, [{"id": "patterns.induction", "label": "induction", "kind": "role",
                                              "threshold": 0.4}], **kw)
    assert len(entries) == 1
    return entries[0]


def test_a_planted_role_is_consistent_in_every_view(tmp_path: Path) -> None:
    _build(tmp_path / "atlas.duckdb", planted=True)
    entry = _entry(tmp_path / "atlas.duckdb", top=3, draws=999)
    for view in ("depth", "profile", "recovery"):
        stat = entry["views"][view]
        assert stat["p"] < 0.01 and stat["q"] < 0.05, (view, stat)
        assert stat["pairs"] == 3
    assert entry["views"]["depth"]["observed"] < entry["views"]["depth"]["null_mean"]
    assert "tokens" not in entry["views"]  # no lens readouts in this atlas: the view is absent, not zero
    for model in entry["models"].values():
        assert all(abs(h["depth"] - 0.5) < 0.2 for h in model["top"])
    assert "alike beyond chance in depth" in entry["finding"]


def test_a_family_of_many_noise_features_does_not_drown_the_profile(tmp_path: Path) -> None:
    """60 unrelated metrics of one family beside the 6 informative ones of another: each family counts once,
    so the profile still finds the planted role; identifiers and constants are not features at all."""
    from atlas.match import _features

    _build(tmp_path / "atlas.duckdb", planted=True, noise_features=60)
    entry = _entry(tmp_path / "atlas.duckdb", top=3, draws=999)
    for view in ("profile", "recovery"):
        assert entry["views"][view]["q"] < 0.05, (view, entry["views"][view])
    with Atlas(tmp_path / "atlas.duckdb") as atlas:
        key = model_infos(atlas, ["a"])[0]["model_key"]
        features = _features(atlas, key)
    assert "pursuit.noise0" in features and "patterns.induction" in features
    assert "circuits.k_comp_partner_head" not in features and "retrieval.tests_kept" not in features


def test_unrelated_models_are_not_called_consistent(tmp_path: Path) -> None:
    _build(tmp_path / "atlas.duckdb", planted=False, seed=3)
    entry = _entry(tmp_path / "atlas.duckdb", top=3, draws=999)
    assert all(stat["q"] >= 0.05 for stat in entry["views"].values()), entry["views"]
    assert "no view alike beyond chance" in entry["finding"]


def test_the_null_mean_is_the_mean_over_all_head_pairs(tmp_path: Path) -> None:
    """Random k-subsets: the expected block mean of |depth_a - depth_b| is the mean over all pairs."""
    _build(tmp_path / "atlas.duckdb", planted=False)
    entry = _entry(tmp_path / "atlas.duckdb", top=3, draws=4000)
    expected = []
    for a, b in (("a", "b"), ("a", "c"), ("b", "c")):
        da = np.repeat(np.arange(SHAPES[a][0]) / (SHAPES[a][0] - 1), SHAPES[a][1])
        db = np.repeat(np.arange(SHAPES[b][0]) / (SHAPES[b][0] - 1), SHAPES[b][1])
        expected.append(np.abs(da[:, None] - db[None, :]).mean())
    assert entry["views"]["depth"]["null_mean"] == pytest.approx(np.mean(expected), abs=0.01)


def test_the_profile_leaves_the_property_out(tmp_path: Path) -> None:
    """With no metric but the property itself, there is no profile to compare (it would be circular)."""
    db = tmp_path / "atlas.duckdb"
    for alias, (n_layers, n_heads) in SHAPES.items():
        model = model_row(f"{alias}@1:safetensors", alias, n_layers=n_layers, n_heads=n_heads, n_kv_heads=1)
        rows = [{"layer": layer, "head": head, "metric": "patterns.induction", "value": float(layer), "n": 1}
                for layer in range(n_layers) for head in range(n_heads)]
        ingest(db, run_record(f"patterns-{alias}", model["model_key"]), model, {"head_metrics": rows})
    entry = _entry(db, top=3, draws=199)
    assert set(entry["views"]) == {"depth"}


def test_the_profile_leaves_out_a_near_copy_of_the_property(tmp_path: Path) -> None:
    """A second metric that ranks heads as the property does (TransformerLens's variant of a score) is
    left out too: the profile alone must not find the role through its alias."""
    db = tmp_path / "atlas.duckdb"
    rng = np.random.default_rng(0)
    for alias, (n_layers, n_heads) in SHAPES.items():
        model = model_row(f"{alias}@1:safetensors", alias, n_layers=n_layers, n_heads=n_heads, n_kv_heads=1)
        role = rng.uniform(size=n_layers * n_heads)
        metrics = {"patterns.induction": role, "patterns.induction_tl": role * 0.5 + 0.01,
                   **{name: rng.uniform(size=role.size) for name in OTHERS}}
        rows = [{"layer": int(i // n_heads), "head": int(i % n_heads), "metric": m, "value": float(v[i]), "n": 1}
                for m, v in metrics.items() for i in range(role.size)]
        ingest(db, run_record(f"patterns-{alias}", model["model_key"]), model, {"head_metrics": rows})
    entry = _entry(db, top=3, draws=999)
    assert all(p["profile_left_out"] == ["patterns.induction", "patterns.induction_tl"] for p in entry["pairs"])
    assert entry["views"]["recovery"]["q"] >= 0.05 and entry["views"]["profile"]["q"] >= 0.05


def test_benjamini_hochberg_matches_a_worked_example() -> None:
    # p sorted: 0.01, 0.02, 0.03, 0.5 -> p * m / rank = 0.04, 0.04, 0.04, 0.5 (monotone from the top)
    assert _bh([0.5, 0.01, 0.03, 0.02]) == pytest.approx([0.5, 0.04, 0.04, 0.04])


def test_the_report_carries_the_consistency_of_each_role(tmp_path: Path) -> None:
    _build(tmp_path / "atlas.duckdb", planted=True)
    with Atlas(tmp_path / "atlas.duckdb") as atlas:
        data = compare(atlas, ["a", "b", "c"], draws=199)
    assert [e["property"] for e in data["across"]] == ["patterns.induction"]  # the only metric with a role
    assert data["draws"] == 199
