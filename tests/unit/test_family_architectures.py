"""Every family runs on every architecture the README lists (tiny random-weight models, small options)."""

from __future__ import annotations

import math

import pytest

from tests.tiny import BYTE_LEVEL, TINY_CONFIGS, save_tiny
from workers.families import FAMILIES

SMALL = {
    "patterns": {"probe_n": 8, "probe_batch": 2},
    "lens": {"lens_window": 16, "lens_windows": 2, "lens_top_k": 3},
    "ablation": {"ablation_window": 12, "ablation_windows": 2, "ablation_induction_n": 6,
                 "ablation_induction_batch": 2, "ablation_ioi_prompts": 2, "concept_prompts": 2},
    "pursuit": {"verify": "off", "steps": 3, "samples_per_concept": 3, "readout_atoms": 2},
    "retrieval": {"max_context": 256, "retrieval_depths": 2, "retrieval_max_new_tokens": 3,
                  "retrieval_mask_tests": 1},
    "circuits": {"circuits_positions": 32},
    "examples": {"examples_window": 16, "examples_windows": 3, "examples_top_k": 2, "examples_context": 4},
}


TINY_CONCEPTS = """
[evens]
words = ["w10", "w12", "w14", "w16", "w18", "w20"]
prompts = ["w3 w4 w10", "w5 w12 w6", "w7 w8 w9 w14"]
heldout = ["w40 w41", "w42 w43 w44"]
"""


# For byte-level tokenizers (tests/tiny.py BYTE_LEVEL), whose pre-tokenizer splits digits off every w-word
LETTER_CONCEPTS = """
[greek]
words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]
prompts = ["w3 w4 alpha", "w5 beta w6", "w7 w8 w9 gamma"]
heldout = ["w40 omega", "w42 theta w44"]
"""


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    """{architecture-independent file, byte-level file}: concept files whose words are single tokens."""
    root = tmp_path_factory.mktemp("concepts")
    (root / "tiny.toml").write_text(TINY_CONCEPTS)
    (root / "letters.toml").write_text(LETTER_CONCEPTS)
    return {"word-level": str(root / "tiny.toml"), "byte-level": str(root / "letters.toml")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(300)) + "." for i in range(8)))
    return str(path)


def _cases() -> list:
    cases = []
    for family in sorted(FAMILIES):
        for architecture in sorted(TINY_CONFIGS):
            cases.append(pytest.param(family, architecture, id=f"{family}-{architecture}"))
    return cases


@pytest.mark.parametrize(("family", "architecture"), _cases())
def test_every_family_runs_on_every_architecture(family, architecture, corpus, concepts, tmp_path):
    from workers.models import load, resolve
    from workers.options import validate
    from workers.unit import first_non_finite

    lm = load(resolve(str(save_tiny(tmp_path / architecture, architecture))), "cpu")
    options = {**SMALL[family], **({"corpus": corpus} if family != "patterns" else {}),
               **({"concepts": concepts["byte-level" if architecture in BYTE_LEVEL else "word-level"]}
                  if family in ("ablation", "pursuit") else {})}
    f = FAMILIES[family]
    config = f.config(validate([f], options))
    result = f.run(lm, {**config, "dtype": "float32"})
    rows = result.tables["head_examples" if family == "examples" else "head_metrics"]  # examples store no metric
    assert {(r["layer"], r["head"]) for r in rows} >= {(layer, head) for layer in range(lm.adapter.n_layers)
                                                      for head in range(lm.adapter.n_heads)}
    assert first_non_finite(result.tables) is None
    values = [r["score" if family == "examples" else "value"] for r in rows]
    assert all(v is None or math.isfinite(v) for v in values)
