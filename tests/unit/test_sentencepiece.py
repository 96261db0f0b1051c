"""Dummy-prefix SentencePiece tokenizers (Llama-2, Mistral v0.1/0.2; issue 14 item 6): " Mary" on its
own encodes as ['▁', '▁Mary'], so every probe assembled from pieces must encode a piece as it reads
mid-sentence. A tiny Llama with such a tokenizer, trained in the test (tests/tiny.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tiny import save_sentencepiece_llama, sentencepiece_tokenizer
from workers.families.ablation.ioi import NAMES, TEMPLATES, ioi_prompts, single_token_names
from workers.families.retrieval.needles import NEEDLES, build_tests, stop_ids
from workers.probes import adds_dummy_prefix, encode_after

SPACE = "\u2581"


@pytest.fixture(scope="module")
def tokenizer():
    return sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def sp_lm(tmp_path_factory: pytest.TempPathFactory):
    from workers.models import load, resolve

    return load(resolve(str(save_sentencepiece_llama(tmp_path_factory.mktemp("sp") / "sp-llama"))), "cpu")


def _lone_spaces(tokenizer, ids: list[int]) -> int:
    return sum(1 for t in tokenizer.convert_ids_to_tokens(ids) if t == SPACE)


def test_the_tokenizer_adds_a_dummy_prefix_like_llama2(tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" Mary", add_special_tokens=False)) == [SPACE, "▁Mary"]
    assert tokenizer.convert_ids_to_tokens(encode_after(tokenizer, " Mary")) == ["▁Mary"]
    assert tokenizer.convert_ids_to_tokens(encode_after(tokenizer, "\n")) == ["<0x0A>"]
    assert adds_dummy_prefix(tokenizer)


def test_ioi_uses_the_names_and_reads_like_the_template(tokenizer) -> None:
    assert len(single_token_names(tokenizer)) == len(NAMES)
    s = ioi_prompts(tokenizer, len(tokenizer), n_prompts=len(TEMPLATES), seed=0)
    assert s.provenance["names"].startswith("single-token names")
    for i in range(len(TEMPLATES)):
        ids = s.tokens[i, 1:int(s.last[i]) + 1].tolist()  # without BOS and padding
        text = tokenizer.decode(ids)
        assert ids == tokenizer.encode(text, add_special_tokens=False)  # as the sentence encodes whole
        io, subject = tokenizer.decode([int(s.io[i])]).strip(), tokenizer.decode([int(s.s[i])]).strip()
        pattern = re.escape(TEMPLATES[i]).replace(r"\{A\}", io).replace(r"\{B\}", subject)
        assert re.fullmatch(pattern.replace(r"\{P\}", r"\w+").replace(r"\{O\}", r"\w+"), text), text
        corrupt = s.corrupted[i, 1:int(s.last[i]) + 1].tolist()
        assert corrupt == tokenizer.encode(tokenizer.decode(corrupt), add_special_tokens=False)


def test_needle_prompts_have_no_stray_word_starts_and_the_span_is_the_answer(tokenizer) -> None:
    texts = tuple(f"Story {i} begins here. The cat sat on the mat." for i in range(40))
    for test in build_tests(tokenizer, texts, [256], [0.0, 50.0, 100.0], needles=NEEDLES[:1]):
        whole = tokenizer.encode(tokenizer.decode(test.ids[1:]), add_special_tokens=False)
        assert _lone_spaces(tokenizer, test.ids[1:]) == _lone_spaces(tokenizer, whole)  # none added by pieces
        assert tokenizer.decode(test.answer_ids) == test.needle.answer
        assert test.needle.sentence.strip() in tokenizer.decode(test.ids[1:])
        assert tokenizer.decode(test.ids[1:]).endswith("Answer:")


def test_stop_ids_hold_the_newline_byte_token(tokenizer) -> None:
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    assert newline in stop_ids(tokenizer)
    assert tokenizer.eos_token_id in stop_ids(tokenizer)


def test_ablation_and_pursuit_run_on_the_dummy_prefix_model(sp_lm, tmp_path: Path) -> None:
    """The IOI probe of a real run uses the names (not random tokens), and the concept words are
    single tokens in their leading-space form."""
    from workers.families.ablation import AblationFamily
    from workers.families.pursuit import PursuitFamily

    family = AblationFamily()
    config = family.config({"ablation_window": 12, "ablation_windows": 1, "ablation_induction_n": 6,
                            "ablation_induction_batch": 2, "ablation_ioi_prompts": 2, "concepts": "colors",
                            "concept_prompts": 1, "method": "exact"})
    result = family.run(sp_lm, config)
    assert result.extra_config["ioi"]["names"].startswith("single-token names")
    assert any(r["metric"] == "ablation.ioi_logit_diff" for r in result.tables["head_metrics"])
    concepts = tmp_path / "c.toml"
    concepts.write_text('[pets]\nwords = ["cat", "dog"]\nprompts = ["The cat sat", "A dog ran"]\n'
                        'heldout = ["in the park"]\n')
    pursuit = PursuitFamily()
    out = pursuit.run(sp_lm, pursuit.config({"concepts": str(concepts), "verify": "off", "steps": 1,
                                             "control_dictionaries": 1, "readout_atoms": 1}))
    tokens = out.extra_config["concept_tokens"]["pets"]
    assert tokens["n_tokens"] == 2 and not tokens["multi_token_words"]
