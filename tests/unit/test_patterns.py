"""Pattern scores against hand-built attention patterns and a loop reference of the TL detector."""

from __future__ import annotations

import math

import pytest
import torch

from workers.families.patterns import METRICS, PatternsFamily, detector_patterns, pattern_scores

N = 6
T = 2 * N + 1


def _tokens(batch: int = 2) -> torch.Tensor:
    x = torch.stack([torch.randperm(50)[:N] + 3 for _ in range(batch)])  # distinct tokens per row
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), x, x], dim=1)


def _scores(attn: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    out = pattern_scores(attn, tokens, N, detector_patterns(tokens))
    return {k: v.mean().item() for k, v in out.items()}


def test_perfect_induction_head() -> None:
    tokens = _tokens()
    attn = torch.zeros(2, 1, T, T)
    attn[..., :, 0] = 1.0  # first half rests on BOS
    for t in range(N + 1, T):
        attn[..., t, :] = 0
        attn[..., t, t - N + 1] = 1.0
    s = _scores(attn, tokens)
    assert s["induction"] == pytest.approx(1.0)
    assert s["duplicate_token"] == pytest.approx(0.0)
    # TransformerLens "mul" divides by every row, so a perfect head scores n / (2n + 1), not 1.
    assert s["induction_tl"] == pytest.approx(N / T)


def test_perfect_previous_token_head() -> None:
    tokens = _tokens()
    attn = torch.zeros(2, 1, T, T)
    attn[..., 0, 0] = 1.0
    attn[..., torch.arange(1, T), torch.arange(T - 1)] = 1.0
    s = _scores(attn, tokens)
    assert s["prev_token"] == pytest.approx(1.0)
    assert s["prev_token_tl"] == pytest.approx((T - 1) / T)
    assert s["mean_distance"] == pytest.approx(1.0)
    assert s["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert s["self_attention"] == pytest.approx(0.0)


def test_uniform_causal_attention() -> None:
    tokens = _tokens()
    attn = torch.ones(T, T).tril()
    attn = (attn / attn.sum(-1, keepdim=True)).expand(2, 1, T, T)
    s = _scores(attn, tokens)
    assert s["bos_sink"] == pytest.approx(sum(1 / (t + 1) for t in range(T)) / T)
    assert s["entropy"] == pytest.approx(sum(math.log(t + 1) for t in range(1, T)) / (T - 1), rel=1e-5)


def _tl_reference(attn: torch.Tensor, tokens: list[int], kind: str) -> float:
    """TransformerLens head_detector 'mul' score, written as loops."""
    t_len = len(tokens)
    target = torch.zeros(t_len, t_len)
    for t in range(t_len):
        for s in range(t + 1):
            if kind == "prev" and s == t - 1:
                target[t, s] = 1
            dup = lambda a, b: b < a and tokens[a] == tokens[b]  # noqa: E731
            if kind == "dup" and dup(t, s):
                target[t, s] = 1
            if kind == "ind" and s >= 1 and dup(t, s - 1):
                target[t, s] = 1
    return float((attn * target).sum() / attn.sum())


def test_tl_scores_match_a_loop_reference() -> None:
    tokens = _tokens(batch=1)
    tokens[0, 3] = tokens[0, 1]  # an accidental repeat inside X, which TL counts too
    logits = torch.randn(1, 3, T, T, generator=torch.Generator().manual_seed(0))
    attn = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9).softmax(-1)
    out = pattern_scores(attn, tokens, N, detector_patterns(tokens))
    for name, kind in (("prev_token_tl", "prev"), ("duplicate_token_tl", "dup"), ("induction_tl", "ind")):
        for head in range(3):
            expected = _tl_reference(attn[0, head], tokens[0].tolist(), kind)
            assert out[name][0, head].item() == pytest.approx(expected, rel=1e-5)


def test_family_on_a_tiny_model(tiny_lm) -> None:
    family = PatternsFamily()
    config = family.config({"probe_n": 8, "probe_batch": 3})
    before = tiny_lm.model.config._attn_implementation
    result = family.run(tiny_lm, config)
    assert tiny_lm.model.config._attn_implementation == before  # eager only for this family
    rows = result.tables["head_metrics"]
    a = tiny_lm.adapter
    assert len(rows) == a.n_layers * a.n_heads * len(METRICS)
    assert {r["metric"] for r in rows} == {f"patterns.{m}" for m in METRICS}
    for row in rows:
        if row["metric"] in ("patterns.induction", "patterns.prev_token", "patterns.bos_sink"):
            assert 0.0 <= row["value"] <= 1.0 + 1e-6
        assert row["n"] == 3
    assert result.tokens == 3 * (2 * 8 + 1)


def _reference_scores(lm, config) -> dict[tuple[str, int, int], float]:
    """The pre-issue-17 path: one forward with output_attentions=True holding every layer's weights."""
    from workers.probes import repeated_tokens

    tokens = repeated_tokens(lm.tokenizer, lm.adapter.unembed.weight.shape[0], n=config["n"],
                             batch=config["batch"], seed=config["seed"])
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = lm.model(tokens, output_attentions=True)
    finally:
        lm.model.set_attn_implementation(previous)
    targets = detector_patterns(tokens)
    ref = {}
    for layer, attn in enumerate(out.attentions):
        for metric, values in pattern_scores(attn, tokens, config["n"], targets).items():
            for head, value in enumerate(values.mean(0).tolist()):
                ref[(f"patterns.{metric}", layer, head)] = value
    return ref


@pytest.mark.parametrize("memory", [None, "1"])
def test_layerwise_scores_match_output_attentions_whatever_the_minibatch(tiny_lm, monkeypatch, memory) -> None:
    """Scores computed inside each layer (weights dropped there) equal the output_attentions path, whether the
    memory model runs all 5 sequences at once or (1 byte free) one per forward."""
    if memory:
        monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", memory)
    family = PatternsFamily()
    config = family.config({"probe_n": 8, "probe_batch": 5})
    rows = family.run(tiny_lm, config).tables["head_metrics"]
    ref = _reference_scores(tiny_lm, config)
    assert len(rows) == len(ref)
    for row in rows:
        assert row["value"] == pytest.approx(ref[(row["metric"], row["layer"], row["head"])], rel=1e-5, abs=1e-6)


def test_the_family_never_asks_for_every_layers_attention(tiny_lm, monkeypatch) -> None:
    """output_attentions=True would keep (batch, heads, T, T) for every layer until the forward ends; the
    family's forwards must return none, and compute the logits of one position only (it reads no logits)."""
    seen = []
    real = tiny_lm.model.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("output_attentions"), out.attentions, out.logits.shape[1]))
        return out

    monkeypatch.setattr(tiny_lm.model, "forward", spy)
    PatternsFamily().run(tiny_lm, PatternsFamily().config({"probe_n": 8, "probe_batch": 2}))
    assert seen and all(not asked and attentions is None and kept == 1 for asked, attentions, kept in seen)
