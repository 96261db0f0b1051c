"""Concept lists: built-ins, user files and inline lists, per-model tokenization, mass and counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlas.errors import BadInput, NotFound
from tests.tiny import tiny_tokenizer
from workers.concepts import (
    Concept,
    builtin_names,
    concept_mass,
    concept_token_ids,
    count_concept_words,
    load_concepts,
    tokenize_concept,
    variants,
)

REQUIRED = {"colors", "countries", "cities", "numbers", "months", "weekdays", "animals", "professions",
            "family", "emotions", "foods", "body_parts"}


def test_builtins_cover_the_required_concepts_and_keep_heldout_apart() -> None:
    concepts = load_concepts(None)
    assert {c.name for c in concepts} >= REQUIRED
    for concept in concepts:
        assert len(concept.words) >= 7 and len(concept.prompts) >= 8 and len(concept.heldout) >= 6
        assert not set(concept.prompts) & set(concept.heldout)
        assert concept.source == "builtin"


def test_user_concepts_from_files_and_inline(tmp_path: Path) -> None:
    txt = tmp_path / "planets.txt"
    txt.write_text("# the inner ones\nMercury\nVenus\n\nEarth  # home\nMars\n")
    toml = tmp_path / "mine.toml"
    toml.write_text('[tools]\nwords = ["hammer", "saw"]\nprompts = ["He grabbed the"]\nheldout = ["She used a"]\n')
    got = load_concepts([str(txt), "gems=ruby/opal", f"kit={toml}", "colors"])
    by_name = {c.name: c for c in got}
    assert by_name["planets"].words == ("Mercury", "Venus", "Earth", "Mars")
    assert by_name["planets"].source == str(txt)
    assert by_name["gems"].words == ("ruby", "opal") and by_name["gems"].source == "inline"
    assert "gems" in by_name["gems"].prompts[0]  # generic prompts name the concept
    assert by_name["kit"].heldout == ("She used a",)
    assert by_name["colors"].source == "builtin"
    assert Concept.from_dict(by_name["gems"].to_dict()) == by_name["gems"]


def test_bad_concepts_are_refused_with_hints(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="unknown concept"):
        load_concepts("colours")
    with pytest.raises(NotFound):
        load_concepts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(BadInput, match="no words"):
        load_concepts(str(empty))
    with pytest.raises(BadInput, match="twice"):
        load_concepts("colors,colors")


def test_tokenization_flags_multi_token_words() -> None:
    tok = tiny_tokenizer()
    concept = Concept("tiny", ("w3", "w4", "w5 w6"), ("p",), ("q",))
    ct = tokenize_concept(concept, tok)
    assert ct.multi_token == ["w5 w6"]
    assert set(ct.word_ids) == {"w3", "w4"}
    assert ct.ids == sorted(tok.convert_tokens_to_ids(["w3", "w4"]))
    assert concept_token_ids(concept, tok) == ct.ids
    assert " w3" in variants("w3") and "W3" in variants("w3")


def test_tokenization_drops_ids_outside_the_unembedding() -> None:
    tok = tiny_tokenizer()
    concept = Concept("tiny", ("w3", "w90"), ("p",), ("q",))
    assert concept_token_ids(concept, tok, n_vocab=50) == [tok.convert_tokens_to_ids("w3")]


def test_concept_mass_is_the_softmax_mass_of_the_ids() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(concept_mass(logits, [1, 3]), torch.tensor([0.6, 0.5]))
    assert concept_mass(logits[0], torch.tensor([0])).shape == ()


def test_count_concept_words_is_whole_word_and_case_insensitive() -> None:
    concept = load_concepts("cities")[0]
    text = "We flew from new york to Paris, then PARIS again; Parisian food is not a city."
    assert count_concept_words(text, concept) == 3


def test_builtin_names_are_stable() -> None:
    assert builtin_names()[:3] == ["colors", "countries", "cities"]
