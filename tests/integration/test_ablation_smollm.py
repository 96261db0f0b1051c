"""Ablation on SmolLM2-135M: the fast path is exact, and the induction circuit shows up causally."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

SMALL = {"ablation_window": 24, "ablation_windows": 1, "ablation_induction_n": 20,
         "ablation_induction_batch": 4, "ablation_ioi_prompts": 6, "concepts": "colors",
         "concept_prompts": 2}


def test_fast_path_equals_one_full_forward_per_head(llama_lm):
    from workers.families.ablation import AblationFamily, induction_probe, ioi_probe
    from workers.families.ablation.exact import clean_run, counterpart_z, exact_effects, naive_effects, replacements

    family = AblationFamily()
    config = family.config({**SMALL, "ablation_induction_n": 10, "ablation_induction_batch": 2})
    a = llama_lm.adapter
    layers = [1, a.n_layers // 2, a.n_layers - 1]
    heads = [(layer, head) for layer in layers for head in (0, a.n_heads - 1)]
    for probe, mode in ((induction_probe(llama_lm, config), "mean"), (ioi_probe(llama_lm, config)[0], "resample")):
        cache = clean_run(llama_lm, probe)
        counter = counterpart_z(llama_lm, probe) if mode == "resample" else None
        reps = replacements(mode, probe, cache.z, counter)
        fast = exact_effects(llama_lm, probe, cache, reps, layers=layers)
        slow = naive_effects(llama_lm, probe, cache, reps, heads)
        for name in fast:
            rows, cols = zip(*heads, strict=True)
            got, want = fast[name][list(rows), list(cols)], slow[name][list(rows), list(cols)]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
            assert want.abs().max() > 1e-3


def test_induction_heads_carry_the_induction_loss(tmp_path):
    """Olsson et al. 2022: removing induction heads hurts in-context copying far more than a typical
    head; the top heads come from the patterns family and the effects from the ablation family."""
    from atlas.store import Atlas
    from workers.build import build

    db = tmp_path / "atlas.duckdb"
    report = build(["llama"], ["patterns", "ablation"], db, device="cpu", executor="local",
                   options={**SMALL, "ablation": "mean", "method": "both"})
    assert not report.failed, report.failed
    with Atlas(db, read_only=True) as atlas:
        rows = atlas.query(
            "SELECT i.layer, i.head, i.value AS induction, e.value AS effect FROM latest_metrics i "
            "JOIN latest_metrics e USING (model_key, layer, head) "
            "WHERE i.metric = 'patterns.induction' AND e.metric = 'ablation.induction_loss'").to_pylist()
        agreement = {r["metric"]: r["value"]
                     for r in atlas.query("SELECT metric, value FROM run_metrics").to_pylist()}
    effects = torch.tensor([r["effect"] for r in rows])
    top = sorted(rows, key=lambda r: -r["induction"])[:5]
    top_effect = torch.tensor([r["effect"] for r in top])
    median = effects.median().abs().item()
    assert top_effect.mean().item() > 10 * max(median, 1e-4)
    # matched controls: the other heads of the same layers
    keys = {(r["layer"], r["head"]) for r in top}
    same_layers = {r["layer"] for r in top}
    control = torch.tensor([r["effect"] for r in rows
                            if r["layer"] in same_layers and (r["layer"], r["head"]) not in keys])
    assert top_effect.mean() > 3 * control.mean().abs()
    assert agreement["ablation.agreement.spearman.induction_loss"] > 0.3
