"""Attribution patching on a tiny random Llama: gradients, the tapped attention, the QK fix."""

from __future__ import annotations

import pytest
import torch

from workers.families.ablation import AblationFamily, spearman
from workers.families.ablation.atp import Tap, atp_effects, exact_pattern_effects, tapped
from workers.families.ablation.exact import clean_run, exact_effects, logits_at, replacements

SMALL = {"ablation_induction_n": 8, "ablation_induction_batch": 3, "ablation_ioi_prompts": 6}


@pytest.fixture(scope="module")
def probe(tiny_lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(f"w{i % 90}" for i in range(200)))
    family = AblationFamily()
    config = family.config({**SMALL, "corpus": str(path)})
    from workers.families.ablation import induction_probe

    return induction_probe(tiny_lm, config)


def test_tapped_attention_matches_the_model(tiny_lm, probe):
    with torch.inference_mode():
        plain = logits_at(tiny_lm, probe.tokens, probe.positions)
        tap = Tap()
        with tapped(tiny_lm, tap):
            mine = logits_at(tiny_lm, probe.tokens, probe.positions)
    torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-4)
    assert len(tap.records) == tiny_lm.adapter.n_layers
    assert tiny_lm.model.config._attn_implementation != "atlas_tap"  # restored


def test_atp_is_the_first_order_limit_of_exact_ablation(tiny_lm, probe):
    """Scaling the patch by eps makes the exact effect linear: exact / eps -> AtP estimate."""
    eps = 1e-3
    cache = clean_run(tiny_lm, probe)
    full = replacements("mean", probe, cache.z)
    small = [z + eps * (r - z) for z, r in zip(cache.z, full, strict=True)]
    exact = exact_effects(tiny_lm, probe, cache, small)["induction_loss"].mean(-1) / eps
    est = atp_effects(tiny_lm, probe, lambda z, c: replacements("mean", probe, z, c), "mean")
    guess = est.z["induction_loss"].mean(-1)
    torch.testing.assert_close(guess, exact, rtol=0.05, atol=2e-3)
    # and at full size it still ranks heads like the exact effects do
    truth = exact_effects(tiny_lm, probe, cache, full)["induction_loss"].mean(-1)
    assert spearman(truth, guess) > 0.5


@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_qk_fix_tracks_exact_pattern_patching_better_than_the_gradient(tiny_lm, probe, mode):
    """AtP* eq. 7-10: recomputing the softmax beats the linear q/k estimate on saturated heads."""
    a = tiny_lm.adapter
    heads = [(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)]
    est = atp_effects(tiny_lm, probe, lambda z, c: replacements(mode, probe, z, c), mode)
    exact = exact_pattern_effects(tiny_lm, probe, mode, heads)["induction_loss"].mean(-1)
    fixed = est.qk["induction_loss"].mean(-1).flatten()
    linear = est.qk_linear["induction_loss"].mean(-1).flatten()
    assert exact.abs().max() > 1e-3
    assert (fixed - exact).abs().mean() < (linear - exact).abs().mean()
    assert spearman(exact, fixed) > 0.5


def test_disjoint_metrics_share_one_backward(tiny_lm, tmp_path, monkeypatch):
    """Concept metrics read disjoint rows: one backward for all equals one backward per metric."""
    import workers.families.ablation.atp as atp
    from workers.families.ablation import concept_probe

    path = tmp_path / "c.toml"
    path.write_text('[a]\nwords = ["w10", "w11"]\nprompts = ["w3 w4", "w5 w6 w7"]\nheldout = ["w8"]\n'
                    '[b]\nwords = ["w20", "w21"]\nprompts = ["w30 w31 w32 w33", "w34"]\nheldout = ["w9"]\n')
    config = AblationFamily().config({**SMALL, "concepts": str(path), "concept_prompts": 2})
    probe, _ = concept_probe(tiny_lm, config)
    assert atp._backward_groups(probe, ["concept.a", "concept.b"]) == [["concept.a", "concept.b"]]
    shared = atp_effects(tiny_lm, probe, lambda z, c: replacements("zero", probe, z, c), "zero")
    monkeypatch.setattr(atp, "_backward_groups", lambda probe, names: [[name] for name in names])
    alone = atp_effects(tiny_lm, probe, lambda z, c: replacements("zero", probe, z, c), "zero")
    for name in ("concept.a", "concept.b"):
        assert shared.z[name].shape[-1] == 2
        torch.testing.assert_close(shared.z[name], alone.z[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(shared.qk[name], alone.qk[name], rtol=1e-4, atol=1e-6)
