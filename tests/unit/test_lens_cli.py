"""Lens family through the CLI on a tiny model: build, bad corpora leave the atlas as it was, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from workers.families.lens.training import LensData, collect, documents, pad_batch, train_layer, training_positions

runner = CliRunner()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = [f"w{i}" for i in range(3, 96)]
    paragraphs = [" ".join(words[(7 * j + k) % len(words)] for k in range(40)) for j in range(30)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="module")
def lens_db(tiny_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("atlas") / "atlas.duckdb"
    result = runner.invoke(app, ["build", "--model", str(tiny_dir), "--families", "lens", "--corpus",
                                 str(corpus_file), "--db", str(db), "--executor", "local", "--json"])
    assert result.exit_code == 0, result.output
    return db


def _bad_corpora(root: Path) -> dict[str, tuple[Path, list[str]]]:
    root.mkdir(exist_ok=True)
    empty = root / "empty.txt"
    empty.write_text("  \n")
    latin = root / "latin1.txt"
    latin.write_bytes(("caf\xe9 " * 300).encode("latin-1"))
    jsonl = root / "nofield.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": "w3 w4 w5 " * 60}) for _ in range(5)))
    parquet = root / "nocol.parquet"
    pq.write_table(pa.table({"body": ["w3 w4 w5 " * 60] * 5}), parquet)
    short = root / "short.txt"
    short.write_text("w3 w4 w5 w6")
    return {"empty": (empty, ["empty"]), "non-utf8": (latin, ["not UTF-8"]),
            "missing field": (jsonl, ["no 'text' field"]), "missing column": (parquet, ["no column 'text'"]),
            "too short": (short, ["too short"])}


def test_bad_corpora_fail_clearly_and_leave_the_atlas_unchanged(lens_db: Path, tiny_dir: Path,
                                                               tmp_path: Path) -> None:
    before = _digest(lens_db)
    lenses = lens_db.with_name(lens_db.stem + "_lenses")
    for name, (path, expected) in _bad_corpora(tmp_path / "bad").items():
        for command in (["build", "--model", str(tiny_dir), "--families", "lens", "--executor", "local"],
                        ["lens", "train", "--model", str(tiny_dir), "--steps", "2"]):
            result = runner.invoke(app, [*command, "--corpus", str(path), "--db", str(lens_db)])
            assert result.exit_code == 2, (name, command, result.output)
            assert any(e in result.output for e in expected), (name, result.output)
            assert _digest(lens_db) == before, name
            assert not lenses.exists()


def test_build_stores_every_head_and_resumes(lens_db: Path, tiny_dir: Path, corpus_file: Path) -> None:
    result = runner.invoke(app, ["query", "SELECT metric, count(*) AS n FROM head_metrics GROUP BY 1 ORDER BY 1",
                                 "--db", str(lens_db), "--json"])
    counts = {r["metric"]: r["n"] for r in json.loads(result.stdout)}
    assert counts == {"lens.direct_effect": 12, "lens.direct_effect_centered": 12}  # 3 layers x 4 heads
    again = runner.invoke(app, ["build", "--model", str(tiny_dir), "--families", "lens", "--corpus",
                                str(corpus_file), "--db", str(lens_db), "--executor", "local", "--json"])
    assert json.loads(again.stdout)["skipped"] == 1


def test_lens_train_records_a_run_and_resumes(lens_db: Path, tiny_dir: Path, corpus_file: Path) -> None:
    base = ["lens", "train", "--model", str(tiny_dir), "--corpus", str(corpus_file), "--db", str(lens_db),
            "--layers", "1,-1", "--docs", "10", "--positions", "16", "--json"]
    first = runner.invoke(app, [*base, "--steps", "4"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert [r["layer"] for r in report["layers"]] == [1, 2]
    weights = Path(report["weights"])
    assert sorted(p.name for p in weights.glob("*.safetensors")) == ["layer_1.safetensors", "layer_2.safetensors"]
    second = runner.invoke(app, [*base, "--steps", "6"])
    resumed = json.loads(second.stdout)
    assert [r["resumed_from"] for r in resumed["layers"]] == [4, 4]
    card = runner.invoke(app, ["show", tiny_dir.name, "2.1", "--db", str(lens_db), "--json"])
    data = json.loads(card.stdout)
    assert {"promote", "suppress", "lens"} <= set(data["tokens"])
    assert {"lens_trained.kl", "lens_trained.kl_init", "lens.direct_effect"} <= {m["metric"] for m in data["metrics"]}
    runs = runner.invoke(app, ["query", "SELECT family, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1",
                               "--db", str(lens_db), "--json"])
    assert {r["family"]: r["n"] for r in json.loads(runs.stdout)}["lens_trained"] == 2


def test_padding_is_never_a_training_position() -> None:
    ids, mask = pad_batch([[1, 5, 6, 7], [1, 8]], pad=0)
    assert ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    keep = training_positions(mask)
    assert keep.tolist() == [[False, True, True, True], [False, True, False, False]]


def test_collect_ignores_what_padding_would_see(tiny_lm) -> None:
    """The same document alone and next to a longer one gives the same training rows."""
    alone = collect(tiny_lm, [[1, 5, 6, 7, 8]], [2])
    padded = collect(tiny_lm, [[1, 5, 6, 7, 8], [1, *range(10, 30)]], [2])
    n = alone.z[2].shape[0]
    assert n == 4 and padded.z[2].shape[0] == 4 + 20
    torch.testing.assert_close(padded.z[2][:n], alone.z[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded.final[:n], alone.final, rtol=1e-4, atol=1e-4)


def test_resumed_training_equals_straight_training(tiny_lm, corpus_file: Path, tmp_path: Path) -> None:
    from workers.corpora import load_corpus

    docs = documents(load_corpus(str(corpus_file)), tiny_lm.tokenizer, 24, 6)
    train: LensData = collect(tiny_lm, docs[:5], [1])
    held: LensData = collect(tiny_lm, docs[5:], [1])
    kwargs = dict(lr=1e-2, bias_lr=0.1, positions=8, seed=0, save_every=2)
    straight = train_layer(tiny_lm, 1, train, held, steps=6, path=tmp_path / "a.safetensors", **kwargs)
    train_layer(tiny_lm, 1, train, held, steps=3, path=tmp_path / "b.safetensors", **kwargs)
    resumed = train_layer(tiny_lm, 1, train, held, steps=6, path=tmp_path / "b.safetensors", **kwargs)
    assert resumed.resumed_from == 3
    assert resumed.kl_after == pytest.approx(straight.kl_after, rel=1e-4)
    assert all(a < b for a, b in zip(straight.kl_after, straight.kl_before, strict=True))


def test_trained_lens_inputs_are_the_heads_real_writes_on_gemma(tmp_path: Path) -> None:
    """Issue 14: on Gemma 2/3 a head's write passes the post-attention norm (gain and per-token 1/rms);
    the lens inputs collected for training, through w_write, must add up to what that norm outputs,
    so that the logit-lens init (and kl_init) is the logit lens."""
    from tests.tiny import save_tiny
    from workers.models import load, resolve

    lm = load(resolve(str(save_tiny(tmp_path / "g", "Gemma3ForCausalLM"))), "cpu")
    a = lm.adapter
    docs = [[1, *range(5, 17)], [1, *range(20, 29)]]
    layer = 1
    norm = a.post_attn_norm(layer)
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    try:
        data = collect(lm, docs, [layer])
    finally:
        handle.remove()
    _, mask = pad_batch(docs, 0)
    written = seen[0][training_positions(mask)].float()  # (n, d_model): the norm's output, kept positions
    summed = torch.einsum("nhk,hkd->nd", data.z[layer], a.w_write(layer).float().cpu())
    torch.testing.assert_close(summed, written, rtol=1e-3, atol=1e-4)
