"""bfloat16 correctness (issue 14 item 9, issue 17 item 4), on tiny models on the CPU: the no-op
ablation (replacement = z) gives ~0 in float32 and bfloat16, a probe where bfloat16 breaks it is
measured in float32, and AtP agrees with the exact effects in bfloat16 as it does in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny
from workers.families.ablation import AblationFamily, spearman
from workers.families.ablation.exact import NOOP_TOLERANCE, clean_run, noop_deviation, noop_holds

SMALL = {"ablation_window": 12, "ablation_windows": 2, "ablation_induction_n": 6, "ablation_induction_batch": 2,
         "ablation_ioi_prompts": 4, "concept_prompts": 2, "method": "both"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bf16")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(300)) + "." for i in range(8)))
    concepts = root / "c.toml"
    concepts.write_text('[evens]\nwords = ["w10", "w12", "w14"]\nprompts = ["w3 w4 w10", "w5 w12 w6 w7"]\n'
                        'heldout = ["w40 w41"]\n')
    return {"corpus": str(corpus), "concepts": str(concepts)}


def _lm(tmp_path: Path, architecture: str, dtype: torch.dtype):
    from workers.models import load, resolve

    lm = load(resolve(str(save_tiny(tmp_path / architecture, architecture))), "cpu")
    lm.model.to(dtype)
    return lm


def _run(lm, inputs):
    family = AblationFamily()
    result = family.run(lm, family.config({**SMALL, **inputs}))
    means = {}
    for row in result.tables["head_metrics"]:
        means.setdefault(row["metric"], {})[row["layer"], row["head"]] = row["value"]
    return result, {m: torch.tensor([v[k] for k in sorted(v)]) for m, v in means.items()}


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_noop_ablation_is_zero_in_float32(tmp_path: Path, inputs, architecture: str) -> None:
    lm = _lm(tmp_path, architecture, torch.float32)
    probes, _ = AblationFamily().probes(lm, AblationFamily().config({**SMALL, **inputs}))
    for probe in probes:
        cache = clean_run(lm, probe)
        deviation = noop_deviation(lm, probe, cache)
        assert max(deviation.values()) < NOOP_TOLERANCE / 10, (probe.name, deviation)
        assert noop_holds(deviation, cache)


def test_bfloat16_breaks_the_noop_on_ioi_and_the_family_measures_it_in_float32(tmp_path: Path, inputs) -> None:
    lm = _lm(tmp_path, "LlamaForCausalLM", torch.bfloat16)
    family = AblationFamily()
    probes, _ = family.probes(lm, family.config({**SMALL, **inputs}))
    ioi = next(p for p in probes if p.name == "ioi")
    cache = clean_run(lm, ioi)
    deviation = noop_deviation(lm, ioi, cache)  # per-length buckets round differently from the clean batch
    assert not noop_holds(deviation, cache), deviation
    result, _ = _run(lm, inputs)
    assert result.extra_config["exact_precision"]["ioi"] == "float32"
    rows = {r["metric"]: r for r in result.tables["run_metrics"]}
    check = rows["ablation.noop.ioi_logit_diff"]
    assert check["value"] > check["detail"]["tolerance"] >= check["detail"]["float32"]
    assert next(lm.model.parameters()).dtype == torch.bfloat16  # cast back after
    for name in ("loss", "induction_loss", "concept.evens"):  # these held in bfloat16
        assert rows[f"ablation.noop.{name}"]["detail"]["exact_in"] in ("bfloat16", "float32")


def test_bfloat16_effects_and_atp_agreement_match_float32(tmp_path: Path, inputs) -> None:
    _, full = _run(_lm(tmp_path, "LlamaForCausalLM", torch.float32), inputs)
    result, half = _run(_lm(tmp_path / "b", "LlamaForCausalLM", torch.bfloat16), inputs)
    for name in ("loss", "induction_loss", "ioi_logit_diff"):
        exact32, exact16 = full[f"ablation.{name}"], half[f"ablation.{name}"]
        scale = float(exact32.abs().max())
        assert float((exact16 - exact32).abs().max()) < 0.1 * scale, name  # bf16 rounding, not noise
        assert spearman(exact16, half[f"ablation.atp.{name}"]) > 0.5, name  # AtP still ranks like exact
        assert abs(spearman(exact16, half[f"ablation.atp.{name}"])
                   - spearman(exact32, full[f"ablation.atp.{name}"])) < 0.2, name
    assert {r["metric"] for r in result.tables["run_metrics"]} >= {"ablation.agreement.spearman.loss"}
