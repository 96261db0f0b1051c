"""The circuits family (weight-only scores) on tiny random models of every supported architecture."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from tests.tiny import TINY_CONFIGS, save_tiny
from workers.families.circuits import (
    CircuitsFamily,
    CompositionFactors,
    HeadWeights,
    composition,
    copying_scores,
    head_weights,
    input_norm,
    unembed_embed,
)
from workers.families.lens import head_readout_matrix, norm_affine

CAPTURE = "head_atlas_test_capture"


def _load(tmp_path, architecture: str, seed: int = 0) -> Any:
    from workers.models import load, resolve

    return load(resolve(str(save_tiny(tmp_path / architecture, architecture, seed))), "cpu")


@contextmanager
def captured(model: Any) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Every attention call's (query, key, value) as the model computes them, through a registered
    attention function that records them and returns the query as the output (any well-shaped output
    does: each layer's residual is captured alongside its own q, k, v)."""
    from transformers import AttentionInterface

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> Any:
        seen.append((query.detach(), key.detach(), value.detach()))
        return query.transpose(1, 2).contiguous(), None

    AttentionInterface.register(CAPTURE, capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        yield seen
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("architecture", sorted(TINY_CONFIGS))
def test_folded_qkv_reproduce_the_models_own_projections(architecture, tmp_path):
    """x @ W' (W' with the input norm's gain and centring folded in) points where the model's q, k, v
    point at position 0 (no rotation there), head by head: the layouts (fused, interleaved, GQA) and
    the folding are read right. Biases and LayerNorm betas are zeroed: the family leaves them out."""
    lm = _load(tmp_path, architecture)
    a = lm.adapter
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    residuals: dict[int, torch.Tensor] = {}
    handles = [input_norm(a, layer).register_forward_pre_hook(
        lambda _m, args, layer=layer: residuals.__setitem__(layer, args[0].detach()))
        for layer in range(a.n_layers)]
    try:
        with captured(lm.model) as seen, torch.no_grad():
            lm.model(torch.tensor([[5, 17, 33, 8]]))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == a.n_layers
    for layer, (query, key, value) in enumerate(seen):
        w = head_weights(a, layer)
        x0 = residuals[layer][0, 0]  # the residual at position 0
        for ours, theirs in ((w.q, query), (w.k, key), (w.v, value)):
            mine = torch.einsum("d,hde->he", x0, ours)  # (heads, dh)
            cos = torch.nn.functional.cosine_similarity(mine, theirs[0, :, 0].float(), dim=-1)
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4), (architecture, layer, cos)


def test_copying_equals_the_full_vocab_by_vocab_circuit(tmp_path):
    """The d_head x d_head shortcut gives the eigenvalues of the full (vocab x vocab) OV circuit."""
    lm = _load(tmp_path, "LlamaForCausalLM")
    a = lm.adapter
    gamma, _, centred = norm_affine(a)
    kv_of = [a.kv_head(h) for h in range(a.n_heads)]
    w_e = lm.model.get_input_embeddings().weight.detach().float()
    w_u = a.unembed.weight.detach().float()
    for layer in range(a.n_layers):
        w = head_weights(a, layer)
        readout = head_readout_matrix(a, layer, gamma, centred)
        copying, positive = copying_scores(readout, unembed_embed(a), w.v, kv_of)
        for head in range(a.n_heads):
            full = (w_e @ w.v[kv_of[head]] @ readout[head] @ w_u.T).double()  # (vocab, vocab)
            eig = torch.linalg.eigvals(full)
            expected = float(eig.real.sum() / eig.abs().sum())
            assert math.isclose(float(copying[head]), expected, rel_tol=1e-3, abs_tol=1e-4)
        flipped, _ = copying_scores(-readout, unembed_embed(a), w.v, kv_of)  # a head that un-copies
        assert torch.allclose(flipped, -copying, atol=1e-5)
        assert ((positive >= 0) & (positive <= 1)).all()


def test_composition_matches_the_d_model_matrices():
    """Elhage et al.'s ||W_A W_B|| / (||W_A|| ||W_B||) on the explicit d_model x d_model matrices."""
    torch.manual_seed(0)
    d, dh, heads = 24, 4, 3

    def layer() -> HeadWeights:
        return HeadWeights(torch.randn(heads, d, dh), torch.randn(1, d, dh), torch.randn(1, d, dh),
                           torch.randn(heads, dh, d))

    a, b = layer(), layer()
    kv_of = [0] * heads  # GQA: one KV head for all three query heads
    fa, fb = CompositionFactors.of(a, kv_of), CompositionFactors.of(b, kv_of)

    def score(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x @ y).norm() / (x.norm() * y.norm()))

    for kind in ("q", "k", "v"):
        got = composition(fa.writer, fb.readers[kind])
        for i in range(heads):
            ov_a = a.v[0] @ a.o[i]
            for j in range(heads):
                qk_b = b.q[j] @ b.k[0].T
                w_b = {"q": qk_b, "k": qk_b.T, "v": b.v[0] @ b.o[j]}[kind]
                assert math.isclose(float(got[i, j]), score(ov_a, w_b), rel_tol=1e-4), (kind, i, j)


@pytest.mark.parametrize("architecture", sorted(TINY_CONFIGS))
def test_circuits_runs_on_every_architecture(architecture, tmp_path):
    from workers.options import validate
    from workers.unit import first_non_finite

    lm = _load(tmp_path, architecture)
    family = CircuitsFamily()
    config = family.config(validate([family], {"circuits_positions": 32}))
    result = family.run(lm, {**config, "dtype": "float32"})
    rows = result.tables["head_metrics"]
    a = lm.adapter
    metrics: dict[str, set[tuple[int, int]]] = {}
    for r in rows:
        metrics.setdefault(r["metric"], set()).add((r["layer"], r["head"]))
    every = {(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)}
    assert metrics["circuits.copying"] == every
    assert metrics["circuits.k_comp_max"] == {(la, h) for la, h in every if la > 0}  # layer 0 reads no earlier head
    assert metrics["circuits.k_comp_out_max"] == {(la, h) for la, h in every if la < a.n_layers - 1}
    assert first_non_finite(result.tables) is None
    assert all(-1 - 1e-6 <= r["value"] <= 1 + 1e-6 for r in rows if r["metric"] == "circuits.copying")
    assert all(0 <= r["value"] <= 1 + 1e-6 for r in rows if r["metric"].endswith(("_comp_max", "_comp_mean")))
    for kind in ("q", "k", "v"):  # the best pair seen from its reader and from its writer
        best_in = max(r["value"] for r in rows if r["metric"] == f"circuits.{kind}_comp_max")
        best_out = max(r["value"] for r in rows if r["metric"] == f"circuits.{kind}_comp_out_max")
        assert math.isclose(best_in, best_out, rel_tol=1e-6)
    partners = [(r["value"], r["layer"]) for r in rows if r["metric"] == "circuits.v_comp_partner_layer"]
    assert all(p < layer for p, layer in partners)
    absolute = architecture == "GPT2LMHeadModel"  # the only one with learned position embeddings
    assert ("circuits.qk_prev_token_positional" in metrics) == absolute
    assert result.tables["run_metrics"][0]["metric"] == "circuits.composition_baseline"


def test_composition_can_be_turned_off(tmp_path):
    lm = _load(tmp_path, "LlamaForCausalLM")
    family = CircuitsFamily()
    result = family.run(lm, family.config({"circuits_composition": False}))
    assert {r["metric"] for r in result.tables["head_metrics"]} == {"circuits.copying",
                                                                   "circuits.copying_positive_share"}


# -- atlas.circuits: the comparison with the other families (torch-free, over a seeded atlas) -----------
def _atlas_with(fresh_atlas, copying, induction) -> Any:
    from atlas.store import Atlas
    from tests.seed import head_rows, ingest, model_row, run_record

    model = model_row("w@1:safetensors", "w", n_layers=4, n_heads=6, n_kv_heads=2)
    ingest(fresh_atlas, run_record("patterns-w", model["model_key"]), model,
           {"head_metrics": head_rows("patterns.induction", model, induction)})
    if copying is not None:
        ingest(fresh_atlas, run_record("circuits-w", model["model_key"], family="circuits"), model,
               {"head_metrics": head_rows("circuits.copying", model, copying)})
    return Atlas(fresh_atlas, read_only=True)


def test_circuit_predictions_find_a_planted_relation_against_layer_matched_heads(fresh_atlas):
    from atlas.circuits import circuit_predictions

    induction = {(2, 1): 0.9, (2, 4): 0.8, (3, 0): 0.7}  # three induction heads, in layers 2 and 3
    # copying rises with depth everywhere (a layer effect) and is highest on exactly those heads
    with _atlas_with(fresh_atlas, lambda la, h: 0.1 * la + (0.5 if (la, h) in induction else 0.0),
                     lambda la, h: induction.get((la, h), 0.01 * h + 0.001)) as atlas:
        rows = {r["target"]: r for r in circuit_predictions(atlas, "w", k=3, draws=500)}
    row = rows["patterns.induction"]
    assert sorted(map(tuple, row["top_heads"])) == sorted(induction)
    assert row["top_k_target"] > 0.7 and row["p_top"] == 0.0  # no layer-matched random set does as well
    assert row["labelled"] == 3 and row["labelled_predictor"] > row["random_predictor"] and row["p_labelled"] == 0.0
    assert "retrieval.score" not in rows  # not measured: no row, not a made-up one


def test_circuit_predictions_see_no_relation_where_there_is_none(fresh_atlas):
    """Copying that only tracks depth must not look predictive once random heads come from the same layers."""
    from atlas.circuits import circuit_predictions

    with _atlas_with(fresh_atlas, lambda la, h: la + 0.01 * ((7 * h) % 6),
                     lambda la, h: 0.1 * la + 0.01 * ((5 * h + 3 * la) % 6)) as atlas:
        row = circuit_predictions(atlas, "w", k=6, draws=500)[0]
    assert 0.05 < row["p_top"] < 0.95


def test_circuit_predictions_say_what_to_build_when_there_are_no_circuits(fresh_atlas):
    from atlas.circuits import circuit_predictions
    from atlas.errors import NotFound

    with _atlas_with(fresh_atlas, None, None) as atlas, pytest.raises(NotFound, match="--families circuits"):
        circuit_predictions(atlas, "w")
