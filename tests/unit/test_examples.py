"""The examples family (workers/families/examples.py) and its atlas side (atlas/examples.py): stored rows
match an independent `output_attentions=True` pass, the streamed top-k is the corpus's top-k, the state
is bounded, old files migrate, and the head page and the HeadVis export show the examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch

from atlas.store import Atlas
from tests.tiny import save_tiny
from workers.families.examples import CRITERIA, ExamplesFamily, ExampleStats, reduced_per_layer
from workers.options import validate

SMALL = {"examples_window": 20, "examples_windows": 9, "examples_batch": 2, "examples_top_k": 3,
         "examples_context": 6, "examples_after": 2, "examples_min_position": 3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Word-level text for the tiny tokenizer, with repeats so that some heads have something to find."""
    path = tmp_path_factory.mktemp("examples-corpus") / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(11 * i + j * (i % 3 + 1)) % 90}" for j in range(60)) + "."
                                for i in range(10)))
    return str(path)


def _load(tmp_path: Path, architecture: str) -> Any:
    from workers.models import load, resolve

    return load(resolve(str(save_tiny(tmp_path / architecture, architecture))), "cpu")


def _run(lm: Any, corpus: str, **changes: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    family = ExamplesFamily()
    config = family.config(validate([family], {**SMALL, "corpus": corpus, **changes}))
    return config, family.run(lm, config).tables["head_examples"]


def _reference(lm: Any, config: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Every window's tokens, every layer's full attention weights (output_attentions=True, eager, one
    forward over all windows) and every layer's per-head write norms ||z_h W_O^h|| (B, T, H)."""
    from workers.corpora import load_corpus, token_windows
    from workers.hooks import capture_z
    from workers.probes import bos_id

    tokens = token_windows(load_corpus(config["corpus"]), lm.tokenizer, config["window"], config["windows"],
                           bos=bos_id(lm.tokenizer))
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), capture_z(lm.adapter) as zs:
            out = lm.model(tokens, output_attentions=True, use_cache=False)
            writes = [lm.adapter.head_outputs(layer, zs[layer]).norm(dim=-1) for layer in range(lm.adapter.n_layers)]
    finally:
        lm.model.set_attn_implementation(previous)
    return tokens, list(out.attentions), writes


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel", "Gemma3ForCausalLM"])
def test_stored_rows_are_the_models_attention_rows(architecture: str, corpus: str, tmp_path: Path) -> None:
    lm = _load(tmp_path, architecture)
    config, rows = _run(lm, corpus)
    tokens, attentions, writes = _reference(lm, config)
    assert {r["criterion"] for r in rows} == set(CRITERIA)
    for r in rows:
        window, q, start = r["source_window"], r["source_pos"], r["source_pos"] - r["query_pos"]
        stop = start + len(r["tokens"])
        assert r["token_ids"] == tokens[window, start:stop].tolist()
        assert r["tokens"] == [lm.tokenizer.decode([i]) for i in r["token_ids"]]
        assert start == max(0, q - config["context"] + 1) and stop == min(config["window"], q + config["after"] + 1)
        row = attentions[r["layer"]][window, r["head"], q]  # (T,)
        assert r["attention"] == pytest.approx(row[start:stop].tolist(), abs=2e-3)
        assert all(v == 0 for v in r["attention"][r["query_pos"] + 1:])  # causal: nothing after the query
        if r["criterion"] == "max_attention":
            per_query = attentions[r["layer"]][window, r["head"], config["min_position"]:, 1:].amax(-1)
            assert r["score"] == pytest.approx(float(row[1:q + 1].max()), rel=1e-4, abs=1e-6)
            assert r["score"] == pytest.approx(float(per_query.max()), rel=1e-4, abs=1e-6)
        elif lm.adapter.post_attn_norm(r["layer"]) is None:  # Gemma's write has its norm in it: see below
            norms = writes[r["layer"]][window, config["min_position"]:, r["head"]]
            assert r["score"] == pytest.approx(float(writes[r["layer"]][window, q, r["head"]]), rel=1e-3)
            assert r["score"] == pytest.approx(float(norms.max()), rel=1e-3)


def _brute_top_k(scores: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """Per-window best scores (windows,) -> the k best (score, window), ties to the earlier window."""
    pairs = sorted(((float(s), w) for w, s in enumerate(scores.tolist())), key=lambda p: (-p[0], p[1]))
    return pairs[:k]


def test_streamed_top_k_is_the_corpus_top_k(corpus: str, tmp_path: Path) -> None:
    lm = _load(tmp_path, "LlamaForCausalLM")
    config, rows = _run(lm, corpus)  # 9 windows in batches of 2: the top-k is merged four times
    _, attentions, writes = _reference(lm, config)
    m, k = config["min_position"], config["top_k"]
    for layer in range(lm.adapter.n_layers):
        best = {"max_attention": attentions[layer][:, :, m:, 1:].amax(-1).amax(-1),  # (windows, H)
                "max_write": writes[layer][:, m:].amax(1)}
        for head in range(lm.adapter.n_heads):
            for criterion, per_window in best.items():
                got = [(r["score"], r["source_window"]) for r in rows
                       if (r["layer"], r["head"], r["criterion"]) == (layer, head, criterion)]
                want = _brute_top_k(per_window[:, head], k)
                assert [w for _, w in got] == [w for _, w in want], (layer, head, criterion)
                assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-4)
    ranks = sorted({r["rank"] for r in rows})
    assert ranks == list(range(1, k + 1))


def test_state_and_storage_are_bounded(corpus: str, tmp_path: Path) -> None:
    lm = _load(tmp_path, "LlamaForCausalLM")
    _, few = _run(lm, corpus, examples_windows=4)
    config, many = _run(lm, corpus, examples_windows=12)
    heads = lm.adapter.n_layers * lm.adapter.n_heads
    assert len(few) == len(many) == heads * len(CRITERIA) * config["top_k"]  # rows do not grow with the corpus
    assert max(len(r["tokens"]) for r in many) <= config["context"] + config["after"]
    assert all(len(r["tokens"]) == len(r["token_ids"]) == len(r["attention"]) for r in many)
    _, fewer = _run(lm, corpus, examples_windows=2)  # fewer windows than top_k: no empty slots stored
    assert len(fewer) == heads * len(CRITERIA) * 2

    from workers.corpora import load_corpus, token_windows
    from workers.probes import bos_id

    tokens = token_windows(load_corpus(corpus), lm.tokenizer, config["window"], 8, bos=bos_id(lm.tokenizer))
    stats = ExampleStats(lm.adapter, config["top_k"], config["context"], config["min_position"])
    held = []
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        for start in range(0, 8, 2):
            with torch.inference_mode(), reduced_per_layer(lm.adapter, stats, start):
                lm.model(tokens[start:start + 2], logits_to_keep=1, use_cache=False)
            held.append(sum(t.nbytes for c in stats.kept.values() for kept in c
                            for t in (kept.scores, kept.windows, kept.positions, kept.rows)))
    finally:
        lm.model.set_attn_implementation(previous)
    per_head = len(CRITERIA) * config["top_k"] * (4 + 8 + 8 + 4 * config["context"])
    assert held == [heads * per_head] * 4


# -- the atlas side ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples_db(tiny_dir: Path, corpus: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """patterns and examples over the tiny Llama, built in-process as `atlas build` builds."""
    from workers.build import build

    db = tmp_path_factory.mktemp("examples-atlas") / "atlas.duckdb"
    report = build([str(tiny_dir)], ["patterns", "examples"], db, device="cpu", executor="local",
                   options={**SMALL, "corpus": corpus, "probe_n": 6, "probe_batch": 2})
    assert not report.failed, report.failed
    return db


def _model_key(db: Path) -> str:
    with Atlas(db) as atlas:
        return atlas.con.execute("SELECT model_key FROM models").fetchall()[0][0]


def test_head_examples_come_from_the_latest_run(examples_db: Path) -> None:
    from atlas.examples import context_text, head_examples

    key = _model_key(examples_db)
    with Atlas(examples_db) as atlas:
        found = head_examples(atlas, key, 1, 2)
        stored = atlas.con.execute("SELECT count(*) FROM head_examples WHERE layer = 1 AND head = 2").fetchall()
    assert set(found) == set(CRITERIA) and sum(map(len, found.values())) == stored[0][0] == 2 * SMALL["examples_top_k"]
    for criterion, examples in found.items():
        assert [e["rank"] for e in examples] == [1, 2, 3]
        assert [e["score"] for e in examples] == sorted((e["score"] for e in examples), reverse=True)
        assert all(isinstance(e["tokens"], list) and isinstance(e["attention"], list) for e in examples)
        line = context_text(examples[0])
        assert "{" + examples[0]["tokens"][examples[0]["query_pos"]] + "}" in line, criterion


def _downgrade_to_v2(db: Path) -> None:
    """What schema version 2 wrote: no head_examples table."""
    con = duckdb.connect(str(db))
    con.execute("DROP TABLE head_examples")
    con.execute("UPDATE atlas_meta SET value = '2' WHERE key = 'schema_version'")
    con.close()


def _snapshot(db: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary "
                                       "ORDER BY 1").fetchall()]
    out = {name: con.execute(f"SELECT * FROM {name} ORDER BY ALL").fetchall() for name in names}
    con.close()
    return out


def test_a_version_2_file_reads_without_examples_and_migrates_keeping_its_data(examples_db: Path,
                                                                                tmp_path: Path) -> None:
    from atlas import schema
    from atlas.pages.data import head_card

    db = tmp_path / "v2.duckdb"
    db.write_bytes(examples_db.read_bytes())
    _downgrade_to_v2(db)
    before, raw = _snapshot(db), db.read_bytes()
    with Atlas(db) as atlas:  # read-only: an empty TEMP head_examples, nothing written
        card = head_card(atlas, _model_key(examples_db), 0, 0)
        assert card["examples"] == {} and card["metrics"]
    assert db.read_bytes() == raw
    with Atlas.writer(db) as atlas:
        version = atlas.con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()
    assert version == [(str(schema.SCHEMA_VERSION),)] == [("3",)]
    after = _snapshot(db)
    assert after.pop("head_examples") == []
    assert after.pop("atlas_meta") == [("schema_version", "3")]
    assert before.pop("atlas_meta") == [("schema_version", "2")]
    assert after == before  # every other table of the version 2 file, row for row
    with Atlas.writer(db):  # a second open migrates nothing more
        pass


def test_headvis_export_carries_the_sequences(examples_db: Path, tmp_path: Path) -> None:
    from atlas.export import export_headvis

    with Atlas(examples_db) as atlas:
        (root,) = export_headvis(atlas, tmp_path / "hv").values()
        stored = atlas.execute("SELECT * FROM head_examples WHERE layer = 2 AND head = 1 AND "
                               "criterion = 'max_attention' ORDER BY rank").to_pylist()
    head = json.loads((Path(root) / "heads" / "L2H1.json").read_text())
    config = json.loads((Path(root) / "config.json").read_text())
    assert config["n_intervals"] == 1
    assert any(r["family"] == "examples" for r in config["pipeline_config"]["runs"])
    sequences = head["sequences"]
    assert len(sequences) == len(stored) == SMALL["examples_top_k"]
    for seq, row in zip(sequences, stored, strict=True):
        tokens, attention = json.loads(row["tokens"]), json.loads(row["attention"])
        n, q = len(tokens), row["query_pos"]
        assert seq["tokens"] == tokens and seq["max_activation"] == row["score"] and seq["interval"] == 0
        dense = [0.0] * (n * n)
        for index, value in zip(seq["attention_indices"], seq["attention_values"], strict=True):
            dense[index] = value
        assert dense[q * n:(q + 1) * n] == attention  # the query row, and nothing else
        assert sum(dense) == pytest.approx(sum(attention))
        assert seq["max_activation"] == pytest.approx(max(attention[1:q + 1]), abs=1e-3)
    assert head["statistics"]["n_samples"] == len(sequences)
    assert set(head["examples"]) == set(CRITERIA)


def test_head_page_shows_the_examples(examples_db: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from atlas.server import AtlasService, create_app
    from cli.serve import WorkerBuilder

    key = _model_key(examples_db)  # before the service holds the file
    service = AtlasService(examples_db, WorkerBuilder(examples_db, "local", None, "cpu", data_dirs=[tmp_path]),
                           sql_timeout_s=2.0, max_rows=200)
    try:
        with TestClient(create_app(service), raise_server_exceptions=False) as client:
            page = client.get(f"/{key}/1/0")
            card = client.get(f"/api/heads/{key}/1/0").json()
    finally:
        service.close()
    assert page.status_code == 200, page.text
    html = page.text
    for criterion in CRITERIA:
        assert f"Examples: {criterion}" in html and f'data-criterion="{criterion}"' in html
        first = card["examples"][criterion][0]
        assert f'data-query-pos="{first["query_pos"]}"' in html
        assert f">{first['tokens'][first['query_pos']]}</span>" in html
    assert html.count('class="example"') == 2 * SMALL["examples_top_k"]
    assert html.count(" query\"") == 2 * SMALL["examples_top_k"]  # one marked query token per example


def test_atlas_show_prints_the_examples(examples_db: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["show", _model_key(examples_db), "1.0", "--db", str(examples_db), "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert set(card["examples"]) == set(CRITERIA)
    table = CliRunner().invoke(app, ["show", _model_key(examples_db), "1.0", "--db", str(examples_db),
                                     "--format", "csv"])
    assert table.exit_code == 0 and '"max_write",1,' in table.stdout
