"""Lens family on tiny random models: the head-space reduction equals brute-force DLA."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer
from workers.adapters import adapter_for, norm_gain
from workers.families.lens import (
    LensFamily,
    LensStats,
    clean_run,
    frozen_scale,
    norm_affine,
)
from workers.models import LoadedModel


def _lm(architecture: str) -> LoadedModel:
    model = tiny_model(architecture)
    adapter = adapter_for(architecture).bind(model)
    return LoadedModel(None, model, tiny_tokenizer(), adapter, "cpu", "float32")


@pytest.mark.parametrize("architecture", sorted(TINY_CONFIGS))
def test_frozen_scale_reconstructs_the_final_norm(architecture: str) -> None:
    lm = _lm(architecture)
    gamma, beta, centred = norm_affine(lm.adapter)
    tokens = torch.randint(3, 96, (2, 12))
    with clean_run(lm.adapter) as run, torch.no_grad():
        lm.model(tokens)
    x, y = run["norm_in"], run["norm_out"]
    s = frozen_scale(x, y, gamma, beta, centred)
    xc = x - x.mean(-1, keepdim=True) if centred else x
    torch.testing.assert_close(s[..., None] * gamma * xc + beta, y, rtol=1e-4, atol=1e-4)


def _brute_force(lm: LoadedModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head d_model outputs at every position, through the frozen norm and W_U (the slow way)."""
    a = lm.adapter
    gamma, beta, centred = norm_affine(a)
    with clean_run(a) as run, torch.no_grad():
        lm.model(tokens)
    s = frozen_scale(run["norm_in"], run["norm_out"], gamma, beta, centred)[:, 1:-1]  # (B, P)
    w_u = a.unembed.weight.detach()
    de, dla_sum = [], []
    for layer in range(a.n_layers):
        out = a.head_outputs(layer, run["z"][layer].flatten(2))  # (B, T, H, d_model)
        post = a.post_attn_norm(layer)
        if post is not None:  # Gemma: each head's share of gamma * attn_out / rms(attn_out)
            rms = out.sum(2).square().mean(-1).add(post.eps).rsqrt()  # (B, T)
            out = out * rms[..., None, None] * norm_gain(post, a.d_model)
        out = out[:, 1:-1]  # (B, P, H, d_model)
        if centred:
            out = out - out.mean(-1, keepdim=True)
        logits = torch.einsum("bphd,vd->bphv", out * gamma, w_u) * s[..., None, None]  # (B, P, H, V)
        target = tokens[:, 2:, None, None].expand(-1, -1, a.n_heads, 1)
        de.append(logits.gather(-1, target)[..., 0].mean((0, 1)))
        dla_sum.append(logits.sum((0, 1)))
    return torch.stack(de), torch.stack(dla_sum)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel", "Gemma3ForCausalLM"])
def test_head_space_reduction_matches_brute_force(architecture: str) -> None:
    lm = _lm(architecture)
    tokens = torch.randint(3, 96, (3, 10))
    stats = LensStats(lm.adapter)
    stats.add(lm, tokens[:2])
    stats.add(lm, tokens[2:])
    want_de, want_sum = _brute_force(lm, tokens)
    got_de = torch.cat(stats.window_de).mean(0)
    torch.testing.assert_close(got_de, want_de, rtol=1e-4, atol=1e-4)
    for layer in range(lm.adapter.n_layers):
        want = want_sum[layer] / stats.positions
        want = want - want.mean(-1, keepdim=True)
        torch.testing.assert_close(stats.mean_dla(layer), want, rtol=1e-4, atol=1e-4)
    # centred direct effect = raw effect minus the head's mean push on every token
    centred = torch.cat(stats.window_dec).mean(0)
    assert not torch.allclose(centred, got_de)


def test_family_rows_have_every_head_and_ranked_tokens(tiny_lm: LoadedModel) -> None:
    family = LensFamily()
    config = family.config({"lens_windows": 3, "lens_window": 16, "lens_top_k": 5})
    assert config["corpus"] == "embedded" and config["corpus_id"].startswith("embedded:")
    result = family.run(tiny_lm, config)
    a = tiny_lm.adapter
    metrics = result.tables["head_metrics"]
    assert {r["metric"] for r in metrics} == {"lens.direct_effect", "lens.direct_effect_centered"}
    assert len(metrics) == 2 * a.n_layers * a.n_heads
    assert all(r["n"] == 3 and r["stderr"] is not None for r in metrics)
    tokens = result.tables["head_tokens"]
    assert len(tokens) == a.n_layers * a.n_heads * 2 * 5
    one = [r for r in tokens if (r["layer"], r["head"], r["kind"]) == (1, 2, "promote")]
    assert [r["rank"] for r in one] == [1, 2, 3, 4, 5]
    assert all(x["score"] >= y["score"] for x, y in itertools.pairwise(one))
    low = [r for r in tokens if (r["layer"], r["head"], r["kind"]) == (1, 2, "suppress")]
    assert low[0]["score"] < 0 < one[0]["score"]  # centred over the vocabulary
    assert result.tokens == 3 * 16


def test_memory_short_minibatches_store_the_same_numbers_and_keep_one_logit_row(tiny_lm: LoadedModel,
                                                                                 monkeypatch) -> None:
    """With 1 byte 'free' the lens runs one window per forward (workers/batching.py) instead of lens_batch;
    every stored number is the same, and no forward computes more than one position's logits."""
    family = LensFamily()
    config = family.config({"lens_windows": 4, "lens_window": 16, "lens_top_k": 3, "lens_batch": 4})
    widths: list[tuple[int, int]] = []
    real = tiny_lm.model.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        widths.append((int(args[0].shape[0]), int(out.logits.shape[1])))
        return out

    monkeypatch.setattr(tiny_lm.model, "forward", spy)
    whole = family.run(tiny_lm, config)
    assert widths == [(4, 1)]
    widths.clear()
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", "1")
    split = family.run(tiny_lm, config)
    assert widths == [(1, 1)] * 4
    for table in ("head_metrics", "head_tokens"):
        for a, b in zip(whole.tables[table], split.tables[table], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
                elif key != "token_text":
                    assert b[key] == a[key]
