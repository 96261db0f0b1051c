"""Lens readouts on SmolLM2: the atlas's direct effects predict ablation; trained lenses beat their init."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from atlas.queries import rank_heads
from atlas.store import Atlas
from workers.corpora import load_corpus, token_windows
from workers.families.lens.training import collect, documents, train_layer
from workers.hooks import edit_z
from workers.plan import plan
from workers.probes import bos_id
from workers.unit import run_unit

pytestmark = pytest.mark.slow
WINDOW, BUILD_WINDOWS, K = 64, 8, 6


@pytest.fixture(scope="module")
def lens_atlas(llama_lm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("lens-llama") / "atlas.duckdb"
    units = plan([llama_lm.source], ["lens"], {"lens_windows": BUILD_WINDOWS, "lens_window": WINDOW}, "float32")
    result = run_unit(llama_lm, units[0], db.with_name("shards"))
    assert result.ok, result.error
    with Atlas.writer(db) as atlas:
        atlas.ingest(result.shard)
    return db


def ablation_drops(lm, tokens: torch.Tensor, head_sets: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Zero-ablate each set of heads (one batch row each) on one window (1, T); mean drop of the actual
    next token's logit minus the mean logit over the vocabulary (the part a softmax sees): (n_sets,)."""
    rows = tokens.expand(len(head_sets) + 1, -1)  # row 0 clean, row i ablates head_sets[i - 1]

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        hits = [(i + 1, h) for i, heads in enumerate(head_sets) for lay, h in heads if lay == layer]
        if not hits:
            return None
        z = z.clone()
        for row, head in hits:
            z[row, :, head] = 0
        return z

    with edit_z(lm.adapter, edit), torch.inference_mode():
        logits = lm.model(rows).logits[:, 1:-1]  # (rows, P, vocab): positions 1 .. T-2, as in the atlas
    target = tokens[0, 2:]
    picked = logits.gather(-1, target.expand(len(rows), -1)[..., None])[..., 0] - logits.mean(-1)  # (rows, P)
    return (picked[0] - picked[1:]).mean(-1)


def test_largest_direct_effects_are_the_heads_whose_removal_hurts_most(lens_atlas: Path, llama_lm) -> None:
    """The atlas's top heads by direct effect on the next token, removed together, lower the next
    token's (centred) logit on held-out text more than any of 8 random sets from the same layers."""
    with Atlas(lens_atlas) as atlas:
        ranked = rank_heads(atlas, "lens.direct_effect_centered", "llama", top=10_000).to_pylist()
    assert len(ranked) == 270
    top = [(r["layer"], r["head"]) for r in ranked[:K]]
    rng = random.Random(0)
    n_heads = llama_lm.adapter.n_heads
    controls = [[(layer, rng.choice([h for h in range(n_heads) if (layer, h) not in top])) for layer, _ in top]
                for _ in range(8)]  # layer-matched, disjoint from the atlas's heads
    tokens = token_windows(load_corpus(None), llama_lm.tokenizer, WINDOW, BUILD_WINDOWS + 2,
                           bos=bos_id(llama_lm.tokenizer))[BUILD_WINDOWS:]  # held out from the build
    drops = torch.stack([ablation_drops(llama_lm, window[None], [top, *controls]) for window in tokens]).mean(0)
    print(f"atlas top-{K} heads {top}: centred next-token logit drop {drops[0]:.3f}; "
          f"8 layer-matched random sets: {', '.join(f'{d:.3f}' for d in drops[1:])}")
    assert drops[0] > 0
    assert drops[0] > drops[1:].sort().values[-2]  # beats at least 7 of the 8 random sets
    assert drops[0] > 2 * drops[1:].median().clamp_min(0.01)


def test_readouts_are_real_tokens_and_centred(lens_atlas: Path) -> None:
    with Atlas(lens_atlas) as atlas:
        rows = atlas.query("SELECT kind, count(*) AS n, min(score) AS lo, max(score) AS hi FROM head_tokens "
                           "GROUP BY kind ORDER BY kind").to_pylist()
    assert [r["kind"] for r in rows] == ["promote", "suppress"]
    assert all(r["n"] == 270 * 50 for r in rows)
    assert rows[0]["lo"] > 0 > rows[1]["hi"]


def test_trained_lenses_beat_their_logit_lens_init(llama_lm, tmp_path: Path) -> None:
    docs = documents(load_corpus(None), llama_lm.tokenizer, 48, 12)
    layer = llama_lm.adapter.n_layers - 1
    train = collect(llama_lm, [d for i, d in enumerate(docs) if i % 4], [layer])
    held = collect(llama_lm, docs[::4], [layer])
    result = train_layer(llama_lm, layer, train, held, steps=15, lr=1e-3, bias_lr=0.1, positions=16, seed=0,
                         path=tmp_path / "lens.safetensors")
    before, after = sum(result.kl_before) / 9, sum(result.kl_after) / 9
    print(f"layer {layer}: held-out KL {before:.3f} (logit lens init) -> {after:.3f} after 15 steps")
    assert all(a < b for a, b in zip(result.kl_after, result.kl_before, strict=True))
