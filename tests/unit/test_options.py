"""Declared family options: one validator for every door, and the guard against non-finite results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from atlas.errors import BadInput
from workers.families import FAMILIES
from workers.families.base import FamilyResult, head_metric_rows
from workers.options import Option, declared_by, reference, resolve, validate


def test_every_family_declares_its_options_once_and_documents_them():
    declared = declared_by(FAMILIES.values())  # raises if two families disagree on a shared name
    assert {"seed", "probe_n", "lens_windows", "ablation", "k_fractions", "max_context"} <= set(declared)
    for family in FAMILIES.values():
        for option in family.options:
            assert option.help and option.kind in ("int", "float", "str", "bool", "floats", "text")
            if option.default is not None:  # every default passes its own check
                assert option.check(option.default) == option.default
        family.config({})  # the defaults alone make a config
    text = reference(FAMILIES.values())
    assert all(f"`{name}`" in text for name in declared)


def test_docs_option_reference_is_generated_from_the_declarations():
    doc = Path(__file__).parents[2] / "docs" / "options.md"
    assert doc.read_text() == reference(FAMILIES.values()) + "\n", \
        "docs/options.md is stale: run `python -m workers.families > docs/options.md`"


@pytest.mark.parametrize(("options", "message"), [
    ({"probe_n": 0}, "option 'probe_n' = 0 is out of range: must be >= 2"),
    ({"probe_batch": 0}, "option 'probe_batch' = 0 is out of range"),
    ({"seed": 2**70}, "option 'seed'"),
    ({"seed": -1}, "option 'seed' = -1"),
    ({"seed": True}, "not an integer"),
    ({"probe_n": "ten"}, "not an integer"),
    ({"lens_top_k": float("inf")}, "not an integer"),
    ({"k_fractions": [0.01, float("nan")]}, "not a finite number"),
    ({"k_fractions": []}, "an empty list"),
    ({"ablation": "half"}, "not one of zero, mean, global_mean, resample"),
    ({"probe_m": 3}, "reads the option 'probe_m'"),
])
def test_bad_values_are_refused_with_the_option_named(options: dict[str, Any], message: str):
    with pytest.raises(BadInput) as info:
        validate(list(FAMILIES.values()), options)
    assert message in info.value.message
    assert info.value.hint  # says what to pass


def test_values_are_typed_and_build_wide_options_pass_any_build():
    got = validate([FAMILIES["lens"]], {"lens_windows": "8", "seed": 3, "concepts": "colors"})
    assert got == {"lens_windows": 8, "seed": 3, "concepts": "colors"}
    resolved = resolve(FAMILIES["patterns"].options, {"probe_n": 7.0})
    assert resolved == {"probe_n": 7, "probe_batch": 10, "seed": 0}
    assert Option("x", "floats", None, "h", min=0, max=1).check(0.5) == [0.5]


class NaNFamily:
    """Writes one NaN among finite values, like a probe set too small for its metric."""

    name = "nan_test"
    version = 1
    stores = ("head_metrics",)
    options = ()

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"which": "nan"}

    def probe_set(self, config: dict[str, Any]) -> str:
        return "none"

    def run(self, lm: Any, config: dict[str, Any]) -> FamilyResult:
        values = torch.ones(lm.adapter.n_layers, lm.adapter.n_heads)
        values[1, 2] = float("nan")
        return FamilyResult({"head_metrics": head_metric_rows("nan_test.x", values, None, 1)}, tokens=1)


def test_a_non_finite_result_fails_the_unit_and_stores_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch):
    from atlas.store import Atlas
    from workers.build import build

    monkeypatch.setitem(FAMILIES, "nan_test", NaNFamily())
    db = tmp_path / "a.duckdb"
    report = build([str(tiny_dir)], ["nan_test"], db, device="cpu", executor="local")
    assert len(report.failed) == 1
    error = next(iter(report.failed.values()))
    assert "non-finite value in head_metrics: metric=nan_test.x, layer=1, head=2" in error
    with Atlas(db, read_only=True) as atlas:
        assert atlas.query("SELECT count(*) AS n FROM head_metrics").to_pylist()[0]["n"] == 0
        assert atlas.query("SELECT status FROM runs").to_pylist() == [{"status": "failed"}]


def test_prose_definitions_are_stored_with_each_run_but_never_hashed(tiny_lm, monkeypatch, tmp_path) -> None:
    """Rewording how a metric is defined must not force a rebuild; the words still reach the atlas."""
    from workers.plan import plan
    from workers.unit import run_unit

    patterns = FAMILIES["patterns"]
    before = plan([tiny_lm.source], ["patterns"], {"probe_n": 4, "probe_batch": 2}, "float32")[0]
    monkeypatch.setattr(type(patterns), "definitions", {**patterns.definitions, "sampler": "reworded"})
    after = plan([tiny_lm.source], ["patterns"], {"probe_n": 4, "probe_batch": 2}, "float32")[0]
    assert after.run_id == before.run_id and "sampler" not in after.config
    result = run_unit(tiny_lm, after, tmp_path)
    assert result.ok and result.run["config"]["definitions"]["sampler"] == "reworded"
    for family in FAMILIES.values():  # config() holds values; a sentence there is prose in the hash
        prose = [k for k, v in family.config({}).items() if isinstance(v, str) and len(v.split()) > 3]
        assert not prose, f"{family.name}.config() hashes prose: {prose}; move it to `definitions`"
