"""The pursuit family and the editing machinery on a tiny random Llama (mechanics, not behaviour)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from atlas.errors import BadInput, NotFound
from tests.tiny import tiny_model
from workers.families.pursuit import PursuitFamily, final_gain
from workers.families.pursuit.editing import k_values, layer_matched_random, measure, row_scales, scale_tensor
from workers.hooks import scaled
from workers.plan import stable_hash

TINY_CONCEPTS = """
[evens]
words = ["w10", "w12", "w14", "w16", "w18", "w20"]
prompts = ["w3 w4 w10", "w5 w12 w6", "w7 w8 w9 w14", "w30 w31"]
heldout = ["w40 w41", "w42 w43 w44", "w45"]

[odds]
words = ["w11", "w13", "w15", "w17", "w19"]
prompts = ["w50 w51 w11", "w52 w13", "w53 w54 w55", "w60 w61 w62"]
heldout = ["w70 w71", "w72 w73", "w74"]
"""
SMALL = {"n_random": 3, "max_new_tokens": 4, "loss_windows": 2, "window": 16, "k_fractions": [0.1, 0.25]}


@pytest.fixture()
def concept_file(tmp_path: Path) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONCEPTS)
    return str(path)


def test_config_records_choices_and_refuses_bad_input(concept_file: str) -> None:
    family = PursuitFamily()
    config = family.config({"concepts": concept_file, "criterion": "l2"})
    assert config["criterion"] == "l2" and [c["name"] for c in config["concepts"]] == ["evens", "odds"]
    assert "gamma" in PursuitFamily.definitions["dictionary"] and config["verify"]["n_random"] == 10
    assert config["ranking"] == "specificity" and config["control"]["dictionaries"] == 2
    assert stable_hash(config) != stable_hash(family.config({"concepts": concept_file, "criterion": "l2",
                                                             "ranking": "evr"}))
    with pytest.raises(BadInput, match="ranking"):
        family.config({"concepts": concept_file, "ranking": "logits"})
    assert stable_hash(config) != stable_hash(family.config({"concepts": concept_file}))
    with pytest.raises(BadInput, match="criterion"):
        family.config({"concepts": concept_file, "criterion": "max"})
    with pytest.raises(NotFound):
        family.config({"concepts": "colours"})


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_run_stores_ranks_readout_and_edits(tiny_lm, concept_file: str, criterion: str) -> None:
    family = PursuitFamily()
    config = family.config({"concepts": concept_file, "criterion": criterion, "steps": 3, "readout_atoms": 4,
                            "readout_candidates": 16, **SMALL})
    result = family.run(tiny_lm, config)
    n_layers, n_heads = tiny_lm.adapter.n_layers, tiny_lm.adapter.n_heads
    scores = result.tables["concept_scores"]
    assert len(scores) == 2 * n_layers * n_heads
    for name in ("evens", "odds"):
        mine = [r for r in scores if r["concept"] == name]
        assert sorted(r["rank"] for r in mine) == list(range(1, n_layers * n_heads + 1))
        ordered = sorted(mine, key=lambda r: r["rank"])
        assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(ordered))
        evr = {(m["layer"], m["head"]): m["value"] for m in result.tables["head_metrics"]
               if m["metric"] == f"pursuit.evr.{name}"}
        ctrl = {(m["layer"], m["head"]): m["value"] for m in result.tables["head_metrics"]
                if m["metric"] == f"pursuit.evr_control.{name}"}
        assert len(evr) == len(ctrl) == n_layers * n_heads
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in (*evr.values(), *ctrl.values()))
        for r in mine:  # the ranking score is the concept EVR minus the control EVR
            assert r["score"] == pytest.approx(evr[r["layer"], r["head"]] - ctrl[r["layer"], r["head"]], abs=1e-6)
    readout = result.tables["head_tokens"]
    assert {r["kind"] for r in readout} == {"pursuit"} and len(readout) == 4 * n_layers * n_heads
    edits = result.tables["edits"]
    assert {e["metric"] for e in edits} == {"concept_mass", "concept_words", "corpus_loss"}
    assert {e["selection"] for e in edits} == {"pursuit", "logit-lens", "random-0", "random-1", "random-2"}
    for e in edits:
        if e["selection"].startswith("random"):
            pursuit = next(p for p in edits if p["edit_id"] == e["edit_id"].replace(e["selection"], "pursuit"))
            assert not {tuple(h) for h in e["heads"]} & {tuple(h) for h in pursuit["heads"]}
            assert sorted(h[0] for h in e["heads"]) == sorted(h[0] for h in pursuit["heads"])
    assert any(m["metric"].startswith("pursuit.verify.evens") for m in result.tables["run_metrics"])
    assert result.extra_config["n_samples"] == 8


def test_k_values_and_layer_matched_random() -> None:
    assert k_values(270, [0.01, 0.02, 0.05]) == [3, 5, 14]
    assert k_values(72, [0.01, 0.02, 0.05]) == [1, 4]
    selected = [(0, 1), (0, 2), (3, 0)]
    for seed in range(5):
        drawn = layer_matched_random(selected, 4, 4, random.Random(seed))
        assert sorted(lay for lay, _ in drawn) == [0, 0, 3] and not set(drawn) & set(selected)
    full = [(1, h) for h in range(3)]  # 3 of 4 heads in layer 1: only one free there
    drawn = layer_matched_random(full, 4, 4, random.Random(0))
    assert len(drawn) == 3 and (1, 3) in drawn and not set(drawn) & set(full)


def test_per_row_scales_equal_one_setting_per_forward(tiny_lm) -> None:
    """Batching settings as rows (one forward) gives each row what its own forward gives."""
    settings = [[], [(0, 1)], [(1, 0), (2, 3)]]
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    n_layers, n_heads = tiny_lm.adapter.n_layers, tiny_lm.adapter.n_heads
    scales = scale_tensor(settings, -1.0, n_layers, n_heads, 1)
    with torch.inference_mode():
        with row_scales(tiny_lm, scales):
            batched = tiny_lm.model(ids.repeat(3, 1)).logits
        for i, heads in enumerate(settings):
            with scaled(tiny_lm.adapter, heads, -1.0):
                single = tiny_lm.model(ids).logits
            torch.testing.assert_close(batched[i], single[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[2])


def test_measure_baseline_is_the_same_in_any_batch(tiny_lm, concept_file: str) -> None:
    from workers.concepts import concept_token_ids, load_concepts

    concept = load_concepts(concept_file)[0]
    ids = concept_token_ids(concept, tiny_lm.tokenizer)
    alone = measure(tiny_lm, concept, ids, [[]], 1.0, None, 3)
    mixed = measure(tiny_lm, concept, ids, [[(0, 0)], [], [(1, 1)]], -1.0, None, 3)
    assert alone["concept_mass"][0] == pytest.approx(mixed["concept_mass"][1], rel=1e-4)
    assert alone["concept_words"][0] == mixed["concept_words"][1]


def test_editing_check_batches_settings_by_the_free_memory(tiny_lm, concept_file: str, monkeypatch) -> None:
    """One setting per prefill, decode and loss forward (1 byte free) and every setting in one give the same
    mass, words and corpus loss; the chunk sizes follow the memory free."""
    from workers.batching import editing_settings, loss_settings
    from workers.concepts import concept_token_ids, load_concepts

    concept = load_concepts(concept_file)[0]
    ids = concept_token_ids(concept, tiny_lm.tokenizer)
    settings = [[(0, 0)], [], [(1, 1), (2, 3)], [(2, 2)]]
    windows = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 7, 3, 11, 2, 8]])
    runs = []
    for memory in ("1", str(2**40)):
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
        runs.append(measure(tiny_lm, concept, ids, settings, -1.0, windows, 3))
    one, all_ = runs
    assert one["concept_mass"] == pytest.approx(all_["concept_mass"], rel=1e-4)
    assert one["concept_words"] == all_["concept_words"]
    assert one["corpus_loss"] == pytest.approx(all_["corpus_loss"], rel=1e-4)
    model = tiny_lm.model
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", "1")
    assert editing_settings(model, "cpu", "float32", 8, 12, 4, 37) == 1
    assert loss_settings(model, "cpu", "float32", 1, 64, 37) == 1
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(2**40))
    assert editing_settings(model, "cpu", "float32", 8, 12, 4, 37) == 37
    assert loss_settings(model, "cpu", "float32", 1, 64, 37) == 37
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(2**24))  # 8 MiB of room: bf16 fits at least as many
    assert editing_settings(model, "cpu", "bfloat16", 8, 12, 4, 10**6) >= editing_settings(
        model, "cpu", "float32", 8, 12, 4, 10**6) > 1


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_final_gain_reads_gamma_off_the_norm(architecture: str) -> None:
    from types import SimpleNamespace

    from workers.adapters import adapter_for

    model = tiny_model(architecture)
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.shape[0]))
    lm = SimpleNamespace(adapter=adapter_for(architecture).bind(model))
    expected = norm.weight + 1 if architecture.startswith("Gemma") else norm.weight
    torch.testing.assert_close(final_gain(lm), expected.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_pooled_head_writes_add_up_to_what_the_layer_adds(architecture: str) -> None:
    """Pooled z through the stacked W_O (Gemma: post-attention gain folded in, per-token 1/rms in the
    pooling) summed over heads equals the mean of what attention adds to the residual stream."""
    from types import SimpleNamespace

    from tests.tiny import tiny_tokenizer
    from workers.adapters import adapter_for
    from workers.families.pursuit import pooled_z, stacked_w_o
    from workers.probes import encode_batch

    model = tiny_model(architecture)
    adapter = adapter_for(architecture).bind(model)
    for layer in range(adapter.n_layers):  # a non-trivial gain, so a missing fold would show
        post = adapter.post_attn_norm(layer)
        if post is not None:
            with torch.no_grad():
                post.weight.copy_(torch.linspace(-0.5, 2.0, post.weight.shape[0]))
    lm = SimpleNamespace(adapter=adapter, model=model, tokenizer=tiny_tokenizer(), device=torch.device("cpu"))
    texts = ["a b c d", "b c", "d a a b c"]
    z, _ = pooled_z(lm, texts, batch=2)  # (n, layers, heads, d_head)
    writes = torch.einsum("nhk,hkd->nd", z.reshape(len(texts), -1, adapter.d_head)[:, :adapter.n_heads],
                          stacked_w_o(lm)[:adapter.n_heads])  # layer 0, summed over heads
    ids, mask = encode_batch(lm, texts)
    added: list[torch.Tensor] = []
    block = adapter.blocks[0]
    target = adapter.post_attn_norm(0) or adapter.attention(0)
    handle = target.register_forward_hook(
        lambda _m, _a, out: added.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    keep = mask.clone().float()
    keep[:, 0] = 0.0
    expected = torch.einsum("bt,btd->bd", keep / keep.sum(1, keepdim=True), added[0].float())
    assert block is not None
    torch.testing.assert_close(writes, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel"])
def test_greedy_with_mass_equals_generate(architecture: str, tmp_path) -> None:
    """One prefill feeds both the concept mass and the continuation; the tokens are generate()'s."""
    from tests.tiny import save_tiny
    from workers.families.pursuit.editing import _left_padded, greedy
    from workers.models import load, resolve

    lm = load(resolve(str(save_tiny(tmp_path / "m", architecture))), "cpu")
    ids, mask, pad = _left_padded(lm, ["w3 w4 w5 w6", "w7", "w8 w9"])
    with torch.inference_mode():
        first, out = greedy(lm, ids, mask, 6, pad)
        want = lm.model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
        plain = lm.model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, -1]
    assert torch.equal(out, want[:, :out.shape[1]]) and (want[:, out.shape[1]:] == pad).all()
    torch.testing.assert_close(first, plain, rtol=1e-4, atol=1e-4)


def test_resumed_corpus_loss_equals_a_full_forward_per_setting(tiny_lm) -> None:
    from workers.families.pursuit.editing import CleanWindows, corpus_loss

    windows = torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    settings = [[], [(2, 1)], [(1, 0), (2, 3)], [(0, 2)], [(2, 0)]]
    alphas = [1.0, -1.0, 0.0, 5.0, 1.0]  # the last edits nothing: its loss is the clean one
    got = corpus_loss(tiny_lm, CleanWindows(tiny_lm, windows), settings, alphas)
    for heads, alpha, value in zip(settings, alphas, got, strict=True):
        with torch.inference_mode(), scaled(tiny_lm.adapter, heads, alpha):
            logits = tiny_lm.model(windows).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        assert value == pytest.approx(float(want), rel=1e-5)
    assert got[1] != got[0] and got[4] == got[0]


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_measure_resumed_at_the_lowest_edited_layer_equals_one_setting_at_a_time(architecture, concept_file,
                                                                                 tmp_path) -> None:
    """Settings start at their lowest edited layer from the clean prompts' cache; each gets what a plain
    forward and generate() with only its own edit give."""
    from tests.tiny import save_tiny
    from workers.concepts import concept_mass, concept_token_ids, count_concept_words, load_concepts
    from workers.families.pursuit.editing import _left_padded
    from workers.models import load, resolve

    lm = load(resolve(str(save_tiny(tmp_path / "m", architecture))), "cpu")
    concept = load_concepts(concept_file)[0]
    ids = concept_token_ids(concept, lm.tokenizer)
    settings = [[(2, 1)], [], [(0, 3), (2, 0)], [(1, 2)], [(2, 2), (2, 3)], []]
    alphas = [-1.0, 1.0, 0.0, 5.0, -1.0, 1.0]
    got = measure(lm, concept, ids, settings, alphas, None, 5)
    inp, mask, pad = _left_padded(lm, list(concept.heldout))
    for i, (heads, alpha) in enumerate(zip(settings, alphas, strict=True)):
        with torch.inference_mode(), scaled(lm.adapter, heads, alpha):
            logits = lm.model(inp, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, -1]
            out = lm.model.generate(inp, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad,
                                    temperature=None, top_p=None, top_k=None)[:, inp.shape[1]:]
        texts = lm.tokenizer.batch_decode(out, skip_special_tokens=True)
        assert got["concept_mass"][i] == pytest.approx(float(concept_mass(logits, ids).mean()), rel=1e-4, abs=1e-7)
        words = sum(count_concept_words(t, concept) for t in texts) / len(texts)
        assert got["concept_words"][i] == pytest.approx(words)
    assert len(set(got["concept_mass"])) > 2  # the edits did something on this tiny model


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_resumed_prefill_decodes_the_same_tokens_as_generate(architecture, tmp_path) -> None:
    from tests.tiny import save_tiny
    from workers.families.pursuit.editing import CleanPrompts, _decode, _left_padded, row_scales
    from workers.models import load, resolve

    lm = load(resolve(str(save_tiny(tmp_path / "m", architecture))), "cpu")
    inp, mask, pad = _left_padded(lm, ["w3 w4 w5 w6 w7", "w8", "w9 w10 w11"])
    n_layers, n_heads = lm.adapter.n_layers, lm.adapter.n_heads
    settings = [[(1, 2), (2, 0)], [(1, 0)]]
    scales = scale_tensor(settings, -1.0, n_layers, n_heads, 3)
    with torch.inference_mode():
        clean = CleanPrompts(lm, inp, mask)
        with row_scales(lm, scales):
            cache, first = clean.prefill_from(lm, 1, 2)
            out = _decode(lm, cache, first, mask.repeat(2, 1), 8, pad)
        for i, heads in enumerate(settings):
            with scaled(lm.adapter, heads, -1.0):
                want = lm.model.generate(inp, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                         pad_token_id=pad, temperature=None, top_p=None, top_k=None)[:, inp.shape[1]:]
            mine = out[i * 3:(i + 1) * 3]
            assert torch.equal(mine, want[:, :mine.shape[1]])


def test_layernorm_models_rank_what_the_unembedding_reads(tmp_path, concept_file: str) -> None:
    """Issue 14: on GPT-2 (LayerNorm) a head's write along the all-ones direction never reaches W_U;
    adding it to one head's W_O changes no logit, and must change no pursuit score either."""
    from tests.tiny import save_tiny
    from workers.models import load, resolve

    family = PursuitFamily()
    config = family.config({"concepts": concept_file, "steps": 3, "verify": "off", "readout_atoms": 2})
    lm = load(resolve(str(save_tiny(tmp_path / "gpt2", "GPT2LMHeadModel"))), "cpu")
    before = {(r["layer"], r["head"], r["concept"]): r["score"]
              for r in family.run(lm, config).tables["concept_scores"]}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        logits = lm.model(ids).logits
        proj = lm.adapter.out_proj(1)  # Conv1D: weight (d_in = heads * d_head, d_model)
        d_head = lm.adapter.d_head
        proj.weight[d_head:2 * d_head] += 3.0  # head 1 of layer 1 writes more along (1, ..., 1)
        torch.testing.assert_close(lm.model(ids).logits, logits, rtol=1e-4, atol=1e-4)  # invisible to W_U
    after = {(r["layer"], r["head"], r["concept"]): r["score"]
             for r in family.run(lm, config).tables["concept_scores"]}
    for key, value in before.items():
        assert after[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize("loss_at", ["every", "largest"])
def test_corpus_loss_side_effect_at_every_k_or_the_largest(tiny_lm, concept_file: str, loss_at: str) -> None:
    """The small grid measures the side effect where it is largest; the values it keeps are the ones
    measuring every k gives."""
    family = PursuitFamily()
    options = {"concepts": concept_file, "steps": 3, "readout_atoms": 2, "readout_candidates": 8, **SMALL,
               "k_fractions": [0.1, 0.3], "loss_at": loss_at}
    edits = family.run(tiny_lm, family.config(options)).tables["edits"]
    ks = sorted({e["k"] for e in edits})
    assert len(ks) == 2
    loss_ks = {e["k"] for e in edits if e["metric"] == "corpus_loss"}
    assert loss_ks == (set(ks) if loss_at == "every" else {ks[-1]})
    assert {e["k"] for e in edits if e["metric"] == "concept_mass"} == set(ks)
    if loss_at == "largest":
        every = family.run(tiny_lm, family.config({**options, "loss_at": "every"})).tables["edits"]
        want = {e["edit_id"]: e["after"] for e in every if e["metric"] == "corpus_loss" and e["k"] == ks[-1]}
        got = {e["edit_id"]: e["after"] for e in edits if e["metric"] == "corpus_loss"}
        assert got.keys() == want.keys() and all(got[i] == pytest.approx(want[i], abs=1e-5) for i in got)


def test_pooling_batch_is_what_the_free_memory_holds(tiny_lm, monkeypatch) -> None:
    """Prompts per pooling forward: the `batch` option as an upper bound, lowered to what half the free
    memory holds at the longest prompt's width."""
    from workers.batching import forward_bytes, model_shape
    from workers.families.pursuit import pooling_batch

    texts = ["w3 w4 w10", "w5 w12 w6 w7 w8 w9", "w30"]
    per_prompt = forward_bytes(model_shape(tiny_lm.model), 1 + 6, 4)  # BOS + the longest prompt's 6 tokens
    chosen = {}
    for prompts in (0, 2, 100):
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(int(2 * prompts * per_prompt + 1)))
        chosen[prompts] = pooling_batch(tiny_lm, texts, 16)
    assert chosen == {0: 1, 2: 2, 100: 16}


def test_stored_pursuit_rows_do_not_depend_on_the_pooling_batch(tiny_lm, concept_file: str, monkeypatch) -> None:
    """One prompt per pooling forward (1 byte free) and all of them in one give the same scores and readout."""
    family = PursuitFamily()
    config = family.config({"concepts": concept_file, "steps": 3, "readout_atoms": 4, "readout_candidates": 16,
                            "verify": "off"})
    runs = []
    for memory in ("1", str(2**40)):
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
        runs.append(family.run(tiny_lm, config).tables)
    one_at_a_time, all_at_once = runs
    for table, key in (("concept_scores", ("concept", "layer", "head")), ("head_metrics", ("metric", "layer", "head")),
                       ("head_tokens", ("layer", "head", "rank"))):
        small = {tuple(r[k] for k in key): r for r in one_at_a_time[table]}
        big = {tuple(r[k] for k in key): r for r in all_at_once[table]}
        assert small.keys() == big.keys() and small, table
        value = "value" if table == "head_metrics" else "score"
        for k, row in small.items():
            assert big[k][value] == pytest.approx(row[value], rel=1e-4, abs=1e-6), (table, k)
    ranks = {(r["concept"], r["layer"], r["head"]): r["rank"] for r in one_at_a_time["concept_scores"]}
    assert ranks == {(r["concept"], r["layer"], r["head"]): r["rank"] for r in all_at_once["concept_scores"]}
    tokens = {(r["layer"], r["head"], r["rank"]): r["token_id"] for r in one_at_a_time["head_tokens"]}
    assert tokens == {(r["layer"], r["head"], r["rank"]): r["token_id"] for r in all_at_once["head_tokens"]}
