"""Exact ablation on a tiny random Llama: the fast path equals one plain forward per head."""

from __future__ import annotations

import pytest
import torch

from atlas.errors import BadInput
from workers.families.ablation import AblationFamily, spearman, top_overlap
from workers.families.ablation.exact import (
    MODES,
    _stacked_edit,
    clean_run,
    counterpart_z,
    exact_effects,
    naive_effects,
    replacements,
)
from workers.hooks import edit_z

SMALL = {"ablation_window": 16, "ablation_windows": 3, "ablation_induction_n": 8,
         "ablation_induction_batch": 3, "ablation_ioi_prompts": 6, "concept_prompts": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SMALL plus a short text corpus (the embedded one takes seconds to read)."""
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(40)) for i in range(6)))
    return {**SMALL, "corpus": str(path)}


@pytest.fixture(scope="module")
def probes(tiny_lm, small):
    family = AblationFamily()
    found, _ = family.probes(tiny_lm, family.config(small))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_fast_path_equals_one_full_forward_per_head(tiny_lm, probes, mode):
    a = tiny_lm.adapter
    every_head = [(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)]
    for probe in probes:
        cache = clean_run(tiny_lm, probe)
        counter = counterpart_z(tiny_lm, probe) if mode == "resample" and probe.counterpart is not None else None
        reps = replacements(mode, probe, cache.z, counter)
        fast = exact_effects(tiny_lm, probe, cache, reps, heads_per_pass=3)  # 4 heads: chunks of 3 and 1
        slow = naive_effects(tiny_lm, probe, cache, reps, every_head)
        for name in fast:
            assert not fast[name].isnan().any()
            torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-5)
            if any(bool((r != z).any()) for r, z in zip(reps, cache.z, strict=True)):
                assert fast[name].abs().max() > 1e-4, f"{mode} ablation changed nothing on {name}"


def test_resumed_forward_skips_earlier_blocks(tiny_lm, probes):
    a = tiny_lm.adapter
    probe = probes[0]
    cache = clean_run(tiny_lm, probe)
    calls = [0] * a.n_layers
    handles = [block.register_forward_hook(lambda m, i, o, _l=layer: calls.__setitem__(_l, calls[_l] + 1))
               for layer, block in enumerate(a.blocks)]
    try:
        last = a.n_layers - 1
        exact_effects(tiny_lm, probe, cache, replacements("zero", probe, cache.z), layers=[last])
    finally:
        for handle in handles:
            handle.remove()
    assert calls[:last] == [0] * last and calls[last] == 1  # one stacked forward for all heads
    assert all(isinstance(block, type(a.blocks[last])) for block in a.blocks)  # blocks restored


def test_replacements_by_mode(tiny_lm, probes):
    probe = probes[1]  # BOS + X + X, every token real
    z = clean_run(tiny_lm, probe).z
    mean = replacements("global_mean", probe, z)[1]
    torch.testing.assert_close(mean[0, 1:], z[1][:, 1:].mean((0, 1)).expand_as(mean[0, 1:]))
    torch.testing.assert_close(mean[:, 0], z[1][:, 0])  # position 0 keeps its clean value
    assert replacements("zero", probe, z)[1].abs().max() == 0
    torch.testing.assert_close(replacements("resample", probe, z)[1][1], z[1][0])
    with pytest.raises(ValueError):
        replacements("bogus", probe, z)


def test_config_rejects_bad_options_and_records_choices(small):
    family = AblationFamily()
    with pytest.raises(BadInput):
        family.config({**small, "ablation": "half"})
    with pytest.raises(BadInput):
        family.config({**small, "method": "guess"})
    config = family.config({"corpus": small["corpus"]})
    assert config["ablation"] == "mean" and config["method"] == "both"
    assert config["corpus_id"].startswith("words:")
    assert family.config({**small, "ablation": "zero"}) != family.config(small)  # mode -> new run id


def test_agreement_helpers():
    x = torch.arange(20.0)
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert top_overlap(x, x) == 10
    assert top_overlap(x, x.flip(0)) == 0
    few = torch.arange(6.0).view(2, 3)  # a model with fewer heads than 10: k is the number of heads
    assert top_overlap(few, few) == 6 and top_overlap(few, -few) == 6


def test_heads_per_forward_is_what_the_free_memory_holds(tiny_lm, probes, monkeypatch):
    """One stacked copy per head costs ablation_copy_bytes; the planner uses half the free memory."""
    from workers.batching import ablation_copy_bytes, model_shape
    from workers.families.ablation.exact import heads_per_forward

    probe = probes[0]
    b, t = probe.tokens.shape
    per_copy = ablation_copy_bytes(model_shape(tiny_lm.model), b, t, probe.n_positions, 4)
    chosen = {}
    for copies in (0, 2, 3, 100):
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(int(2 * copies * per_copy + 1)))
        chosen[copies] = heads_per_forward(tiny_lm, probe)
    assert chosen == {0: 1, 2: 2, 3: 3, 100: tiny_lm.adapter.n_heads}


def test_stored_effects_do_not_depend_on_heads_per_forward(tiny_lm, small, monkeypatch):
    """One head per stacked forward (1 byte free) and every head of a layer in one give the same rows."""
    family = AblationFamily()
    config = family.config({**small, "method": "exact"})
    values = []
    for memory in ("1", str(2**40)):
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
        rows = family.run(tiny_lm, config).tables["head_metrics"]
        values.append({(r["metric"], r["layer"], r["head"]): r["value"] for r in rows})
    one_at_a_time, all_at_once = values
    assert one_at_a_time.keys() == all_at_once.keys() and len(one_at_a_time) > 0
    for key, value in one_at_a_time.items():
        assert all_at_once[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_build_stores_effects_estimates_and_agreement(tiny_dir, tmp_path, small):
    from atlas.queries import rank_heads
    from atlas.store import Atlas
    from workers.build import build

    db = tmp_path / "a.duckdb"
    report = build([str(tiny_dir)], ["ablation"], db, device="cpu", executor="local",
                   options={**small, "ablation": "mean", "method": "both"})
    assert not report.failed, report.failed
    with Atlas(db, read_only=True) as atlas:
        top = rank_heads(atlas, "ablation.loss", top=5).to_pylist()
        assert len(top) == 5 and top[0]["value"] >= top[-1]["value"]
        metrics = {r["metric"] for r in atlas.query("SELECT DISTINCT metric FROM head_metrics").to_pylist()}
        for name in ("loss", "induction_loss", "ioi_logit_diff"):
            assert {f"ablation.{name}", f"ablation.atp.{name}", f"ablation.atp_qk.{name}"} <= metrics
        agreement = atlas.query("SELECT metric, value FROM run_metrics").to_pylist()
        names = {r["metric"] for r in agreement}
        assert "ablation.agreement.spearman.loss" in names and "ablation.agreement.top10.ioi_logit_diff" in names
        assert all(-1 <= r["value"] <= 10 for r in agreement)


@pytest.fixture(scope="module")
def concept_file(tmp_path_factory):
    """Three concepts of single-token words of the tiny tokenizer, three prompts each."""
    path = tmp_path_factory.mktemp("concepts") / "tiny.toml"
    tables = []
    for c, start in enumerate((10, 30, 50)):
        words = ", ".join(f'"w{start + i}"' for i in range(5))
        prompts = ", ".join(f'"w{(start + 7 * p + 3) % 90} w{(start + p) % 90} w{start + 2 * p + 1}"'
                            for p in range(3))
        tables.append(f"[c{c}]\nwords = [{words}]\nprompts = [{prompts}]\nheldout = [\"w{start} w1{c}\"]\n")
    path.write_text("\n".join(tables))
    return str(path)


@pytest.mark.parametrize("mode", MODES)
def test_concept_effects_use_each_concepts_own_prompts(tiny_lm, small, concept_file, mode):
    """Issue 13: 3 concepts x 3 prompts batched together; each concept's effect is over its own 3 rows."""
    from workers.concepts import concept_mass, load_concepts, tokenize_concept
    from workers.families.ablation import concept_probe
    from workers.families.ablation.atp import atp_effects

    family = AblationFamily()
    config = family.config({**small, "concepts": concept_file, "concept_prompts": 3})
    probe, _ = concept_probe(tiny_lm, config)
    assert probe is not None and probe.tokens.shape[0] == 9
    cache = clean_run(tiny_lm, probe)
    counter = counterpart_z(tiny_lm, probe) if mode == "resample" and probe.counterpart is not None else None
    reps = replacements(mode, probe, cache.z, counter)
    exact = exact_effects(tiny_lm, probe, cache, reps)
    est = atp_effects(tiny_lm, probe, lambda z, c: replacements(mode, probe, z, c), mode)
    a = tiny_lm.adapter
    for concept in load_concepts(concept_file):
        name = f"concept.{concept.name}"
        assert exact[name].shape == (a.n_layers, a.n_heads, 3), "n must be the concept's own prompts"
        assert est.z[name].shape == (a.n_layers, a.n_heads, 3)
        assert not exact[name].isnan().any()
        # The reference: the concept's own prompts alone, one plain forward per head.
        ids = torch.tensor(tokenize_concept(concept, tiny_lm.tokenizer, a.unembed.weight.shape[0]).ids)
        own = probe.rows_of(name)
        for layer, head in ((0, 1), (a.n_layers - 1, 2)):
            tokens = probe.tokens[own]
            last = probe.valid[own].sum(1) - 1
            with torch.inference_mode():
                clean = concept_mass(tiny_lm.model(tokens).logits[torch.arange(3), last], ids)
                edit = _stacked_edit(layer, [head], reps[layer][own], 3)
                with edit_z(a, edit, [layer]):
                    ablated = concept_mass(tiny_lm.model(tokens).logits[torch.arange(3), last], ids)
            torch.testing.assert_close(exact[name][layer, head], ablated - clean, rtol=1e-3, atol=1e-6)
        if mode == "zero":  # AtP is nonzero on the concept's own rows (it was diluted by the others)
            assert est.z[name].abs().sum() > 0


def test_row_buckets_cut_padding_and_cover_every_row():
    from workers.families.ablation.exact import Probe, row_buckets

    last = torch.tensor([3, 12, 4, 11, 5, 12, 3, 6])
    probe = Probe("p", torch.zeros(8, 13, dtype=torch.long), last, lambda x: {}, torch.ones(8, 13, dtype=torch.bool),
                  per_row=True)
    buckets = row_buckets(probe)
    assert sorted(torch.cat([rows for rows, _ in buckets]).tolist()) == list(range(8))
    assert all(width >= int(last[rows].max()) + 1 for rows, width in buckets)
    assert sum(len(rows) * width for rows, width in buckets) < 8 * 13 * 0.7
    assert len(buckets) <= 3
    whole = Probe("q", torch.zeros(2, 5, dtype=torch.long), torch.arange(4), lambda x: {},
                  torch.ones(2, 5, dtype=torch.bool))
    assert [(rows.tolist(), width) for rows, width in row_buckets(whole)] == [([0, 1], 5)]


def test_mean_ablation_is_per_position_on_template_probes(tiny_lm, probes):
    """IOI takes per-position means over its reference (ABC) distribution; a template probe's position t
    is one slot in every row, so z at t is replaced by the mean at t, not by one vector for all t."""
    corpus, induction, ioi = probes[0], probes[1], probes[2]
    assert induction.aligned and ioi.aligned and not corpus.aligned
    z = clean_run(tiny_lm, induction).z
    mean = replacements("mean", induction, z)[1]
    for t in (1, 5, induction.tokens.shape[1] - 1):
        torch.testing.assert_close(mean[:, t], z[1][:, t].mean(0).expand_as(mean[:, t]))
    torch.testing.assert_close(mean[:, 0], z[1][:, 0])
    assert not torch.allclose(mean, replacements("global_mean", induction, z)[1])
    clean, counter = clean_run(tiny_lm, ioi).z, counterpart_z(tiny_lm, ioi)  # IOI: over the ABC prompts
    mean = replacements("mean", ioi, clean, counter)[0]
    valid = ioi.valid.clone()
    valid[:, 0] = False
    for t in range(1, ioi.tokens.shape[1]):
        rows = valid[:, t]
        if rows.any():
            torch.testing.assert_close(mean[:, t], counter[0][rows, t].mean(0).expand_as(mean[:, t]))
    torch.testing.assert_close(replacements("mean", corpus, clean_run(tiny_lm, corpus).z)[0],
                               replacements("global_mean", corpus, clean_run(tiny_lm, corpus).z)[0])


def test_run_config_says_which_mean_each_probe_got(tiny_lm, small):
    family = AblationFamily()
    result = family.run(tiny_lm, family.config({**small, "method": "exact", "concepts": "colors"}))
    kinds = result.extra_config["mean_ablation"]
    assert kinds["ioi"] == "per position, over the counterpart prompts"
    assert kinds["induction"] == "per position, over the probe's sequences"
    assert kinds["corpus"] == "over the probe's real tokens at positions >= 1"
