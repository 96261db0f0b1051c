"""Pursuit's setup (issue 14 item 5): T stays below the dictionary size, and the control dictionaries
are word tokens of the same kind as the concept's, near them in id rank, recorded in the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import sentencepiece_tokenizer, tiny_tokenizer
from workers.concepts import ControlPools, control_token_ids, token_kind
from workers.families.pursuit import PursuitFamily, pursuit_steps

CONCEPT = """
[evens]
words = ["w10", "w12", "w14", "w16", "w18", "w20"]
prompts = ["w3 w4 w10", "w5 w12 w6", "w7 w8 w9 w14", "w30 w31"]
heldout = ["w40 w41"]
"""


def test_steps_are_capped_below_the_dictionary() -> None:
    config = {"steps": 50, "max_step_fraction": 0.5}
    assert pursuit_steps(config, 32) == 16  # months on SmolLM2: 32 ids, T was 32 (the whole dictionary)
    assert pursuit_steps(config, 200) == 50
    assert pursuit_steps(config, 1) == 1
    assert pursuit_steps({"steps": 50, "max_step_fraction": 1.0}, 32) == 32


@pytest.mark.parametrize(("token", "kind"), [("\u0120May", (True, True)), ("\u2581dog", (True, False)),
                                             ("cat", (False, False)), ("<0x0A>", None), ("\u0120123", None),
                                             ("ing", (False, False)), ("\u0120", None)])
def test_token_kinds(token: str, kind) -> None:
    assert token_kind(token) == kind


def test_controls_are_same_kind_word_tokens_near_in_id_rank() -> None:
    tok = sentencepiece_tokenizer()
    ids = sorted({tok.convert_tokens_to_ids(t) for t in ("\u2581Mary", "\u2581John", "\u2581park", "\u2581gave")})
    pools = ControlPools(tok, len(tok))
    draw = control_token_ids(pools, ids, 3, "0:names", window=8)
    assert draw.matched == len(ids) and draw.fallback == 0
    assert draw.ids == control_token_ids(pools, ids, 3, "0:names", window=8).ids  # seeded
    for dictionary in draw.ids:
        assert len(set(dictionary)) == len(ids) and not set(dictionary) & set(ids)
        for cid, control in zip(ids, dictionary, strict=True):
            assert pools.kind(control) == pools.kind(cid)
            same_kind = pools.pools[pools.kind(cid)]
            # among the 8 nearest free ones (other concept ids and earlier picks are skipped)
            assert abs(same_kind.index(control) - same_kind.index(cid)) <= 8 + 2 * len(ids)
        tokens = tok.convert_ids_to_tokens(dictionary)
        assert all(t.startswith("\u2581") and t[1:].isalpha() for t in tokens), tokens  # no bytes, no specials


def test_word_level_vocabularies_fall_back_to_any_token() -> None:
    tok = tiny_tokenizer()  # "w10": not a word token of any kind
    draw = control_token_ids(ControlPools(tok, len(tok)), [10, 12], 1, "0:x")
    assert draw.fallback == 2 and not set(draw.ids[0]) & {10, 12, *tok.all_special_ids}


def test_the_run_records_t_and_the_draw(tiny_lm, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONCEPT)
    family = PursuitFamily()
    config = family.config({"concepts": str(path), "verify": "off", "readout_atoms": 2, "steps": 50})
    assert config["control"] == {"dictionaries": 2, "draw": "word_tokens_same_kind_id_rank", "window": 32}
    assert config["max_step_fraction"] == 0.5
    info = family.run(tiny_lm, config).extra_config["concept_tokens"]["evens"]
    assert info["n_tokens"] == 6 and info["steps"] == 3
    assert info["control_fallback"] == 6 and info["control_matched"] == 0
