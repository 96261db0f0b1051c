"""The circuits family on the embedded SmolLM2 (weights only, in-process): every head scored, and the
prediction Elhage et al. (2021) and Olsson et al. (2022) make holds in the atlas: the heads with the
strongest K-composition from an earlier head are induction heads, far more than layer-matched random heads.
(Copying scores do not pick out SmolLM2's induction or retrieval heads: docs/circuits.md reports it.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.circuits import circuit_predictions
from atlas.store import Atlas
from workers.build import build

pytestmark = pytest.mark.slow


def test_k_composition_finds_smollm2_induction_heads(tmp_path: Path) -> None:
    db = tmp_path / "atlas.duckdb"
    report = build(["llama"], ["patterns", "circuits"], db, executor="local", device="cpu",
                   options={"probe_batch": 4})
    assert len(report.completed) == 2 and not report.failed
    with Atlas(db, read_only=True) as atlas:
        n_layers, n_heads = atlas.con.execute("SELECT n_layers, n_heads FROM models").fetchall()[0]
        copying = atlas.con.execute("SELECT count(*) FROM latest_metrics WHERE metric = 'circuits.copying'")
        assert copying.fetchall()[0][0] == n_layers * n_heads
        rows = {(r["predictor"], r["target"]): r for r in circuit_predictions(atlas, "llama", k=10, draws=2000)}
    k_comp = rows[("circuits.k_comp_max", "patterns.induction")]
    assert k_comp["spearman"] > 0.3
    assert k_comp["top_k_target"] > 5 * k_comp["random_target"] and k_comp["p_top"] < 0.01
    writers = rows[("circuits.k_comp_out_max", "patterns.prev_token")]  # previous-token heads write into it
    assert writers["top_k_target"] > writers["random_target"] and writers["p_top"] < 0.05
