"""Needle prompts, ROUGE-1 recall, the copy-paste hit rule, and the family end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from workers.corpora import load_corpus
from workers.families.retrieval import RetrievalFamily, copy_hits, distribution, random_same_layers
from workers.families.retrieval.needles import NEEDLES, build_tests, depth_grid, find_span, length_grid, rouge1_recall


def test_rouge1_recall() -> None:
    assert rouge1_recall("a brass telescope", "He owns a Brass telescope.") == 1.0
    assert rouge1_recall("a brass telescope", "a telescope") == pytest.approx(2 / 3)
    assert rouge1_recall("the the cat", "the cat") == pytest.approx(2 / 3)  # clipped counts
    assert rouge1_recall("cat", "") == 0.0


def test_grids() -> None:
    assert depth_grid() == [0.0, 11.0, 22.0, 33.0, 44.0, 56.0, 67.0, 78.0, 89.0, 100.0]  # Wu et al.
    assert length_grid(2048, 3, 512) == [512, 1280, 2048]
    assert length_grid(1024, 1, 512) == [1024]
    assert len(NEEDLES) >= 3 and len({n.name for n in NEEDLES}) == len(NEEDLES)


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    from workers.models import _dequantized_dir, resolve

    return AutoTokenizer.from_pretrained(_dequantized_dir(resolve("llama")))


@pytest.fixture(scope="module")
def prose() -> tuple[str, ...]:
    return load_corpus(None).texts[:60]


@pytest.fixture
def corpus_file(tmp_path, prose) -> str:
    path = tmp_path / "prose.txt"
    path.write_text("\n\n".join(prose))
    return str(path)


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_have_exact_spans(llama_tokenizer, prose, chat: bool) -> None:
    """Every prompt is `length` tokens; the span holds the answer; the needle sits after a sentence end."""
    tok = llama_tokenizer
    depths = depth_grid(5)
    tests = build_tests(tok, prose, [300, 600], depths, chat=chat)
    assert len(tests) == 2 * len(depths) * len(NEEDLES)
    for test in tests:
        assert len(test.ids) == test.length
        assert tok.decode(test.answer_ids).strip() == test.needle.answer
        found = find_span(test.ids, test.answer_ids)  # Wu et al.'s locator: the first window with
        assert found is not None and 0 <= test.span[0] - found[0] <= 2  # > 0.9 set overlap, may start early
        assert test.needle.question in tok.decode(test.ids[-40:])
    starts = [t.span[0] for t in tests if t.needle is NEEDLES[0] and t.length == 600]
    assert starts == sorted(starts) and starts[-1] - starts[0] > 400  # depth moves the needle
    mid = next(t for t in tests if t.depth == 50.0)
    before = tok.decode(mid.ids[mid.span[0] - 20:mid.span[0]])
    assert mid.needle.prefix.strip() in before
    pre = mid.ids[mid.span[0] - len(tok.encode(mid.needle.prefix.rstrip(), add_special_tokens=False)) - 1]
    assert tok.decode([pre]).rstrip().endswith((".", "!", "?"))  # placed after a sentence end


def test_copy_hits() -> None:
    prompt = torch.tensor([5, 6, 7, 8, 9, 7])
    pos = torch.tensor([[2, 5, 3], [1, 2, 0]])  # argmax per (layer, head)
    hits = copy_hits(pos, prompt, (1, 4), token=7)
    # in the span [1, 4) and prompt[pos] == 7: only position 2 (pos 5 holds a 7 outside the span)
    assert hits.tolist() == [[True, False, False], [False, True, False]]


def test_random_heads_come_from_the_same_layers() -> None:
    top = [(0, 1), (0, 2), (3, 0)]
    rand = random_same_layers(top, n_heads=4, seed=0)
    assert sorted(layer for layer, _ in rand) == [0, 0, 3]
    assert not set(rand) & set(top)
    assert random_same_layers(top, 4, 0) == rand  # seeded


def test_distribution_bins_sum_to_one() -> None:
    import numpy as np

    d = distribution(np.array([[0.0, 0.05, 0.2], [0.7, 0.0, 0.1]]))
    assert d == {"=0": 2 / 6, "(0,0.1]": 2 / 6, "(0.1,0.5]": 1 / 6, ">0.5": 1 / 6}


def test_config_validates_and_records_choices(corpus_file) -> None:
    from atlas.errors import BadInput, NotFound

    family = RetrievalFamily()
    config = family.config({"max_context": 2048, "corpus": corpus_file})
    assert config["max_context"] == 2048 and len(config["depths"]) == 10 and len(config["needles"]) >= 3
    assert config["corpus_id"].startswith("prose:")
    with pytest.raises(BadInput):
        family.config({"max_context": 100})
    with pytest.raises(NotFound):
        family.config({"corpus": "/no/such/corpus.txt"})


def test_family_on_a_tiny_model(tiny_lm, corpus_file, tmp_path) -> None:
    """Rows for every head, the grid in the config; a random model answers nothing, so n = 0."""
    family = RetrievalFamily()
    config = family.config({"max_context": 256, "retrieval_depths": 3, "retrieval_max_new_tokens": 4,
                            "corpus": corpus_file})
    result = family.run(tiny_lm, config)
    a = tiny_lm.adapter
    rows = result.tables["head_metrics"]
    metrics = {r["metric"] for r in rows}
    assert metrics == {"retrieval.score", "retrieval.activation_frequency", "retrieval.tests_kept"}
    assert len(rows) == 3 * a.n_layers * a.n_heads
    grid = result.extra_config["grid"]
    assert grid["lengths"] == [256 - 4 - 1] and grid["tests"] == 3 * len(NEEDLES)
    kept = {r["metric"]: r["value"] for r in result.tables["run_metrics"]}["retrieval.tests_kept"]
    assert all(r["n"] == kept for r in rows)
    assert all(r["value"] >= 0.0 for r in rows)
    from atlas.shards import write_shard  # every table must survive the trip to Parquet, schema-checked
    from tests.seed import run_record

    write_shard(tmp_path, run_record("r", tiny_lm.source.key, "retrieval"), tiny_lm.models_row(), result.tables)


def _needle_test(ids: list[int], span: tuple[int, int]):
    from workers.families.retrieval.needles import NeedleTest

    return NeedleTest(NEEDLES[0], len(ids), 50.0, ids, span)


def test_prefix_cache_decodes_like_a_fresh_prefill(tiny_lm) -> None:
    """A prompt sharing the previous one's first 100 tokens reuses their cache: same tokens, same hits."""
    from workers.families.retrieval import PrefixCache, decode, prefill
    from workers.families.retrieval.decode_probe import DecodeProbe, attached

    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 90, (100,), generator=gen).tolist()
    deep = _needle_test([1, *shared, *torch.randint(3, 90, (40,), generator=gen).tolist()], (20, 24))
    shallow = _needle_test([1, *shared, *torch.randint(3, 90, (30,), generator=gen).tolist()], (10, 14))
    cache = PrefixCache(tiny_lm)
    with torch.inference_mode(), attached(tiny_lm.model, DecodeProbe(record=True)) as probe:
        decode(tiny_lm, deep, cache.prefill(deep.ids), probe, 6, [])
        reused = decode(tiny_lm, shallow, cache.prefill(shallow.ids), probe, 6, [])
        fresh = decode(tiny_lm, shallow, prefill(tiny_lm, shallow.ids), probe, 6, [])
    assert cache.reused == 101
    assert reused[0] == fresh[0] and (reused[1] == fresh[1]).all()


def test_masks_decoded_side_by_side_equal_one_decode_per_mask(tiny_lm) -> None:
    import copy

    from workers.families.retrieval import decode, needle_scores, prefill
    from workers.families.retrieval.decode_probe import DecodeProbe, attached, mask_map

    gen = torch.Generator().manual_seed(2)
    test = _needle_test([1, *torch.randint(3, 90, (60,), generator=gen).tolist()], (5, 9))
    masks = {"top": [(0, 1), (2, 3)], "random_0": [(0, 2), (2, 0)], "none": []}
    # needle_scores reduces to ROUGE recall; compare the decoded tokens the same way it does
    ids: dict[str, list[int]] = {}
    with torch.inference_mode(), attached(tiny_lm.model, DecodeProbe(record=False)) as probe:
        cache = prefill(tiny_lm, test.ids)
        for name, heads in masks.items():
            probe.mask = mask_map(heads)
            ids[name], _ = decode(tiny_lm, test, copy.deepcopy(cache), probe, 8, [])
    object.__setattr__(test.needle, "answer", tiny_lm.tokenizer.decode(ids["top"]) or "w1")
    scores = needle_scores(tiny_lm, [test], masks, 8)
    for name in masks:
        want = 1.0 if ids[name] == ids["top"] else None
        if want is not None:
            assert scores[name] == [pytest.approx(want)]
    assert len(set(map(tuple, ids.values()))) > 1, "masks changed nothing on this tiny model"


def test_masking_check_reuses_prefixes_without_changing_answers(tiny_lm) -> None:
    from workers.families.retrieval import needle_scores

    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 90, (80,), generator=gen).tolist()
    tests = [_needle_test([1, *shared, *torch.randint(3, 90, (25,), generator=gen).tolist()], (5, 9))
             for _ in range(3)]  # one length: decoded side by side, 3 tests x 2 masks
    for depth, test in enumerate(tests):
        object.__setattr__(test, "depth", float(depth))  # distinct depths: a fixed order
    masks = {"top": [(0, 1), (2, 3)], "random_0": [(1, 2)]}
    object.__setattr__(tests[0].needle, "answer", "w5 w7 w9 w11 w13 w15 w17 w19 w21 w23 w25 w27 w29 w31")
    together = needle_scores(tiny_lm, tests, masks, 8)
    alone = [needle_scores(tiny_lm, [test], masks, 8) for test in tests]
    for name in masks:
        assert together[name] == [one[name][0] for one in alone]
    assert any(v > 0 for values in together.values() for v in values), "nothing decoded matched: a vacuous test"


def test_needle_tests_decoded_side_by_side_equal_one_at_a_time(tiny_lm) -> None:
    """Prompts of one length, prefilled through the prefix cache and stacked: each row's tokens and
    hits are what its own decode from a fresh prefill gives."""
    from workers.families.retrieval import PrefixCache, decode, decode_tests, prefill, stacked_prefills
    from workers.families.retrieval.decode_probe import DecodeProbe, attached

    gen = torch.Generator().manual_seed(4)
    hay = torch.randint(3, 90, (120,), generator=gen).tolist()
    tests = []
    for cut in (100, 70, 40, 10):  # the needle (w1 w2 w3) deeper first, like the family's order
        ids = [1, *hay[:cut], 91, 92, 93, *hay[cut:]]
        tests.append(_needle_test(ids, (cut + 1, cut + 4)))
    with torch.inference_mode(), attached(tiny_lm.model, DecodeProbe(record=True)) as probe:
        stacked = decode_tests(tiny_lm, tests, stacked_prefills(tiny_lm, tests, PrefixCache(tiny_lm), 7), probe, 7,
                               [5, 6])
        alone = [decode(tiny_lm, t, prefill(tiny_lm, t.ids), probe, 7, [5, 6]) for t in tests]
    for (tokens, hits), (want_tokens, want_hits) in zip(stacked, alone, strict=True):
        assert tokens == want_tokens and (hits == want_hits).all()
    assert any(h.sum() > 0 for _, h in alone) or len({tuple(t) for t, _ in alone}) > 1


def test_decode_rows_follow_free_memory_and_dtype(tiny_lm, monkeypatch) -> None:
    """Rows decoded side by side: as many KV-cache rows as half the free memory holds (after one prefill's
    activations), at most DECODE_BATCH, at least 1; a bf16 cache row costs half a float32 one."""
    from dataclasses import replace

    from workers.batching import forward_bytes, kv_cache_bytes, model_shape
    from workers.families.retrieval import DECODE_BATCH, decode_batch

    shape = model_shape(tiny_lm.model)
    row, fixed = kv_cache_bytes(shape, 1000, 4), forward_bytes(shape, 1000, 4)
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(int(2 * (fixed + 5 * row))))
    assert decode_batch(tiny_lm, 1000) == 5
    assert decode_batch(tiny_lm, 1000, {"_batch_divisor": 2}) == 2  # a retry after an out-of-memory error
    assert decode_batch(replace(tiny_lm, dtype="bfloat16"), 1000) >= 10
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", "1")
    assert decode_batch(tiny_lm, 1000) == 1
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(2**50))
    assert decode_batch(tiny_lm, 1000) == DECODE_BATCH


def test_family_scores_do_not_depend_on_the_decode_rows(tiny_lm, corpus_file, monkeypatch) -> None:
    family = RetrievalFamily()
    config = family.config({"max_context": 256, "retrieval_depths": 3, "retrieval_max_new_tokens": 4,
                            "corpus": corpus_file})
    stacked = family.run(tiny_lm, config).tables["head_metrics"]
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", "1")
    alone = family.run(tiny_lm, config).tables["head_metrics"]
    assert [(r["metric"], r["layer"], r["head"], r["n"]) for r in stacked] == \
        [(r["metric"], r["layer"], r["head"], r["n"]) for r in alone]
    assert [r["value"] for r in stacked] == pytest.approx([r["value"] for r in alone])
