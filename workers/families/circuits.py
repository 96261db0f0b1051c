"""Weight-only circuit scores (Elhage et al. 2021): no forward pass, no corpus, only the weights.

Conventions: row vectors, x @ W. Per head, W_Q^h, W_K^h, W_V^h are (d_model, d_head) and W_O^h is
(d_head, d_model); under GQA a query head uses its KV head's W_K, W_V. What is folded in:

- the block's input norm: its gain gamma_in scales the rows of W_Q, W_K, W_V; a LayerNorm's centring
  (GPT-2, GPT-NeoX) is folded as the projection C = I - 11^T/d_model, so W' = C diag(gamma_in) W;
- Gemma 2/3's post-attention norm gain is folded into W_O (as the lens family does, `w_write`);
- Qwen3 / Gemma 3's per-head q_norm / k_norm gains scale W_Q's / W_K's columns;
- the final norm: gain (and LayerNorm centring) fold into the unembedding side, as in the lens family.
Every norm's per-token 1/rms scale is left out (it is one positive scalar per token, which changes no
eigenvalue's sign and cancels in the composition ratios only approximately); biases (Qwen2's q/k/v,
GPT-2's) and a LayerNorm's beta are left out; RoPE is left out (composition uses W_Q W_K^T as if
query and key sat at the same position); Gemma's embedding scale sqrt(d_model) and final-logit soft cap
change no sign and are left out.

Stored per head (head_metrics):

- `circuits.copying`: Elhage et al.'s copying score sum(lambda) / sum(|lambda|) over the eigenvalues of
  the full OV circuit W_E' W_V W_O W_U'^T (vocab x vocab), in [-1, 1]; +1 = the head copies the token it
  attends to into the logits. Computed from the d_head x d_head matrix W_O (W_U'^T W_E') W_V, which has
  the same non-zero eigenvalues (cyclic permutation); W_U'^T W_E' (d_model x d_model) is formed once.
- `circuits.copying_positive_share`: share of those d_head eigenvalues with a positive real part.
- `circuits.{q,k,v}_comp_max` / `_mean`: the head as reader B: the largest / mean composition score
  ||W_A W_B||_F / (||W_A||_F ||W_B||_F) with every head A of an earlier layer, where W_A = W_OV^A and
  W_B = W_QK^B (Q: W_OV^A W_QK^B; K: W_OV^A W_QK^B^T) or W_OV^B (V); `_partner_layer` / `_partner_head`
  name the A of the max. Layer-0 heads have no earlier head and no rows. `{q,k,v}_comp_out_max`: the
  head as writer A, the largest score with any later head. Exact, through d_head x d_head factors:
  ||V_A O_A X||_F = ||L_A^T O_A X||_F with L_A L_A^T = V_A^T V_A, so a layer pair costs one
  (heads d_head) x d_model x (heads d_head) product.
- `circuits.qk_prev_token_positional` (learned absolute position embeddings only, i.e. GPT-2): the
  attention to position i-1 when only position embeddings enter the QK circuit, softmax over j <= i,
  mean over i in 1..positions-1. Rotary models (every other supported architecture) have no positional
  embedding to read: positional preference from weights alone is not defined there and nothing is stored.

run_metrics `circuits.composition_baseline`: the mean Q/K/V-composition score of Gaussian random
matrices of the same shapes, the level a score must clear to mean anything (Elhage et al. subtract it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from workers.adapters import BoundAdapter, norm_gain
from workers.families.base import FamilyResult, head_metric_rows
from workers.families.lens import centre, head_readout_matrix, norm_affine
from workers.models import LoadedModel
from workers.options import SEED, Option, resolve

KINDS = ("q", "k", "v")
VOCAB_CHUNK = 8192  # unembedding rows read at a time when forming W_U^T W_E (bounds float32 copies)


@contextmanager
def one_thread() -> Iterator[None]:
    """Small (d_head-sized) LAPACK calls on one thread: on a busy CPU, two OpenMP threads made
    torch.linalg.eigvals of four 256 x 256 matrices take 9.9 s instead of 0.29 s (load average 8, 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- reading the weights ------------------------------------------------------------------------
@dataclass
class HeadWeights:
    """One layer's folded per-head weights, float32: q (H, d, dh), k, v (KV, d, dh), o (H, dh, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


def _weight_in_out(module: Any, conv1d: bool) -> torch.Tensor:
    """A projection's weight as (in, out) float32 (nn.Linear stores (out, in), GPT-2's Conv1D (in, out))."""
    w = module.get_parameter("weight").detach().float()
    return w if conv1d else w.T


def _split(w: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """(d_model, n * d_head) -> (n, d_model, d_head)."""
    return w.reshape(w.shape[0], n, d_head).permute(1, 0, 2)


def raw_qkv(adapter: BoundAdapter, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unfolded W_Q (H, d, dh), W_K, W_V (KV, d, dh) of one layer, for every supported layout."""
    attn: Any = adapter.attention(layer)
    h, kv, dh = adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    if hasattr(attn, "q_proj"):  # Llama, Mistral, Qwen2/3, Gemma 2/3
        q, k, v = (_split(_weight_in_out(getattr(attn, name), False), n, dh)
                   for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)))
        return q, k, v
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q | k | v] along the output
        w = _weight_in_out(attn.qkv_proj, False)
        q, k, v = w.split([h * dh, kv * dh, kv * dh], dim=1)
        return _split(q, h, dh), _split(k, kv, dh), _split(v, kv, dh)
    if hasattr(attn, "c_attn"):  # GPT-2: Conv1D, [q | k | v] along the output
        q, k, v = _weight_in_out(attn.c_attn, True).split(h * dh, dim=1)
        return _split(q, h, dh), _split(k, h, dh), _split(v, h, dh)
    if hasattr(attn, "query_key_value"):  # GPT-NeoX: per head [q | k | v], interleaved
        w = _weight_in_out(attn.query_key_value, False).reshape(-1, h, 3, dh)
        q, k, v = (w[:, :, i].permute(1, 0, 2) for i in range(3))
        return q, k, v
    raise NotImplementedError(f"no q/k/v layout known for {type(attn).__name__}")


def input_norm(adapter: BoundAdapter, layer: int) -> torch.nn.Module:
    """The norm in front of the attention block (input_layernorm, GPT-2's ln_1)."""
    block = adapter.blocks[layer]
    for name in ("input_layernorm", "ln_1"):
        if hasattr(block, name):
            return getattr(block, name)
    raise NotImplementedError(f"no input norm known for {type(block).__name__}")


def fold_input(w: torch.Tensor, norm: torch.nn.Module, d_model: int) -> torch.Tensor:
    """C diag(gamma) W for input weights (n, d_model, dh): the norm's gain (and LayerNorm's centring)."""
    if isinstance(norm, torch.nn.LayerNorm):
        gamma = norm.weight.detach().float() if norm.weight is not None else torch.ones(d_model)
        scaled = w * gamma.to(w.device)[:, None]
        return scaled - scaled.mean(1, keepdim=True)
    return w * norm_gain(norm, d_model).to(w.device)[:, None]


def head_weights(adapter: BoundAdapter, layer: int) -> HeadWeights:
    """One layer's weights with every norm gain folded in (see the module docstring for what is not)."""
    q, k, v = raw_qkv(adapter, layer)
    norm = input_norm(adapter, layer)
    q, k, v = (fold_input(w, norm, adapter.d_model) for w in (q, k, v))
    attn = adapter.attention(layer)
    for name, which in (("q_norm", "q"), ("k_norm", "k")):
        if hasattr(attn, name):  # per-head RMSNorm on q / k (Qwen3, Gemma 3): its gain scales the columns
            gain = norm_gain(getattr(attn, name), adapter.d_head).to(q.device)
            if which == "q":
                q = q * gain
            else:
                k = k * gain
    return HeadWeights(q, k, v, adapter.w_write(layer).float())


# -- copying --------------------------------------------------------------------------------------
def unembed_embed(adapter: BoundAdapter, chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """W_U^T W_E, (d_model, d_model), summed over vocabulary chunks (never a vocab x vocab matrix)."""
    w_u = adapter.unembed.weight.detach()
    w_e = adapter.model.get_input_embeddings().get_parameter("weight").detach()
    n = min(w_u.shape[0], w_e.shape[0])  # a padded unembedding may have extra rows
    out = torch.zeros(w_u.shape[1], w_e.shape[1], dtype=torch.float64)
    for start in range(0, n, chunk):
        out += (w_u[start:start + chunk].float().T @ w_e[start:start + chunk].float()).double()  # fp64 sum
    return out.float()


def copying_scores(readout: torch.Tensor, ue: torch.Tensor, v: torch.Tensor,
                   kv_of: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(copying, positive share) per head of one layer, each (H,).

    readout: (H, dh, d) = W_O C diag(gamma_final); ue: W_U^T W_E (d, d); v: folded W_V (KV, d, dh).
    The d_head x d_head matrix readout_h @ ue @ v_kv has the full OV circuit's non-zero eigenvalues.
    """
    through = torch.einsum("de,kef->kdf", ue, v)  # (KV, d, dh): one d x d x dh product per KV head
    small = torch.einsum("hid,hdj->hij", readout, through[kv_of]).double()
    with one_thread():
        eig = torch.linalg.eigvals(small)  # (H, dh), complex
    copying = eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-300)
    positive = (eig.real > 0).double().mean(-1)
    return copying.float(), positive.float()


# -- composition ------------------------------------------------------------------------------------
def gram_root(w: torch.Tensor, side: str) -> torch.Tensor:
    """L with L L^T = W^T W (side 'right': for W (.., d, dh)) or W W^T ('left': W (.., dh, d)), (.., dh, dh).

    By eigendecomposition, not Cholesky: a rank-deficient head (zero rows) must not fail."""
    gram = w.transpose(-1, -2) @ w if side == "right" else w @ w.transpose(-1, -2)
    with one_thread():
        vals, vecs = torch.linalg.eigh(gram.double())
    return (vecs * vals.clamp_min(0).sqrt()[..., None, :]).float()


@dataclass
class CompositionFactors:
    """Per layer, d_head-wide factors whose products give every composition norm exactly.

    writer (H, dh, d): L_V^T W_O, with ||W_OV X||_F = ||writer X||_F; readers[kind] (H, d, dh):
    Q: W_Q L_K, K: W_K L_Q, V: W_V L_O, with ||Y W_B||_F = ||Y readers[kind]||_F for the kind's W_B."""

    writer: torch.Tensor
    readers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, w: HeadWeights, kv_of: list[int]) -> CompositionFactors:
        q, k, v = w.q, w.k[kv_of], w.v[kv_of]  # per query head
        writer = gram_root(v, "right").transpose(-1, -2) @ w.o
        readers = {"q": q @ gram_root(k, "right"), "k": k @ gram_root(q, "right"),
                   "v": v @ gram_root(w.o, "left")}
        return cls(writer, readers)


def composition(writer: torch.Tensor, reader: torch.Tensor) -> torch.Tensor:
    """Scores (H_a, H_b) between every writer head of one layer and every reader head of a later one."""
    ha, dh, d = writer.shape
    hb = reader.shape[0]
    product = writer.reshape(ha * dh, d) @ reader.permute(1, 0, 2).reshape(d, hb * dh)
    norms = product.reshape(ha, dh, hb, dh).square().sum((1, 3)).sqrt()
    return norms / (writer.flatten(1).norm(dim=1)[:, None] * reader.flatten(1).norm(dim=1)[None, :]).clamp_min(1e-30)


def composition_baseline(d_model: int, d_head: int, seed: int, draws: int = 8) -> dict[str, float]:
    """Mean score of Gaussian random weights of the same shapes, per kind (the chance level)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    a = HeadWeights(rand(draws, d_model, d_head), rand(draws, d_model, d_head), rand(draws, d_model, d_head),
                    rand(draws, d_head, d_model))
    b = HeadWeights(rand(draws, d_model, d_head), rand(draws, d_model, d_head), rand(draws, d_model, d_head),
                    rand(draws, d_head, d_model))
    fa, fb = CompositionFactors.of(a, list(range(draws))), CompositionFactors.of(b, list(range(draws)))
    return {kind: float(composition(fa.writer, fb.readers[kind]).diagonal().mean()) for kind in KINDS}


# -- positional preference ------------------------------------------------------------------------------
def absolute_positions(lm: LoadedModel) -> torch.Tensor | None:
    """A learned absolute position embedding (positions, d_model), or None (rotary models)."""
    transformer = getattr(lm.model, "transformer", None)
    wpe = getattr(transformer, "wpe", None)
    return None if wpe is None else wpe.weight.detach().float()


def positional_prev_token(pos: torch.Tensor, w: HeadWeights, kv_of: list[int]) -> torch.Tensor:
    """(H,) mean over i >= 1 of softmax_{j <= i}(P_i W_Q (P_j W_K)^T / sqrt(dh))[i - 1]: P = the position
    embeddings scaled to unit rms after centring, as the input norm would see them alone (the token's
    own embedding is left out); W_Q, W_K folded (gain, centring)."""
    t, dh = pos.shape[0], w.q.shape[-1]
    qs = torch.einsum("td,hde->hte", pos, w.q)
    ks = torch.einsum("td,hde->hte", pos, w.k[kv_of])
    scores = qs @ ks.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    attn = scores.softmax(-1)
    rows = torch.arange(1, t)
    return attn[:, rows, rows - 1].mean(-1)


# -- the family ---------------------------------------------------------------------------------------
class CircuitsFamily:
    name = "circuits"
    version = 1
    stores = ("head_metrics", "run_metrics")

    options = (
        Option("circuits_composition", "bool", True,
               "compute Q/K/V-composition between every pair of layers (the cost grows with layers^2)"),
        Option("circuits_positions", "int", 256, "positions read for the positional QK score (absolute "
               "position embeddings only)", min=2, max=1 << 20),
        SEED,
    )

    definitions: ClassVar[dict[str, str]] = {
        "convention": "row vectors; W_OV = W_V W_O, W_QK = W_Q W_K^T",
        "folded": "input-norm gain (+ LayerNorm centring) into W_Q/W_K/W_V; q_norm/k_norm gains; post-attention "
                  "norm gain into W_O; final-norm gain (+ centring) into W_U",
        "left_out": "per-token norm scales, biases, LayerNorm beta, RoPE, embedding scale, logit soft cap",
        "copying": "sum(eig) / sum(|eig|) of W_O (W_U'^T W_E') W_V (d_head x d_head)",
        "composition": "||W_A W_B||_F / (||W_A||_F ||W_B||_F), Elhage et al. 2021",
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        o = resolve(self.options, options)
        return {"composition": o["circuits_composition"], "positions": o["circuits_positions"], "seed": o["seed"]}

    def probe_set(self, config: dict[str, Any]) -> str:
        return "weights"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        a = lm.adapter
        kv_of = [a.kv_head(h) for h in range(a.n_heads)]
        gamma, _, centred = norm_affine(a)
        ue = unembed_embed(a)
        positions = absolute_positions(lm)
        if positions is not None:
            positions = positions[:config["positions"]]
        copying = torch.zeros(a.n_layers, a.n_heads)
        positive = torch.zeros(a.n_layers, a.n_heads)
        prev_positional = torch.zeros(a.n_layers, a.n_heads)
        stats = CompositionStats(a.n_layers, a.n_heads) if config["composition"] else None
        with torch.inference_mode():
            for layer in range(a.n_layers):
                w = head_weights(a, layer)
                readout = head_readout_matrix(a, layer, gamma.float().cpu(), centred).cpu()
                # the embedding enters through the input norm too: W_E' = W_E C diag(gamma_in), folded in v
                copying[layer], positive[layer] = copying_scores(readout, ue, w.v, kv_of)
                if positions is not None:  # w.q, w.k hold the norm's gain and centring; its scale here:
                    centred_pos = centre(positions, isinstance(input_norm(a, layer), torch.nn.LayerNorm))
                    unit = positions / centred_pos.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
                    prev_positional[layer] = positional_prev_token(unit, w, kv_of)
                if stats is not None:
                    stats.add(layer, CompositionFactors.of(w, kv_of))
        rows = head_metric_rows("circuits.copying", copying, None, 1)
        rows += head_metric_rows("circuits.copying_positive_share", positive, None, a.d_head)
        if positions is not None:
            rows += head_metric_rows("circuits.qk_prev_token_positional", prev_positional, None, len(positions))
        run_metrics: list[dict[str, Any]] = []
        if stats is not None:
            rows += stats.metric_rows()
            baseline = composition_baseline(a.d_model, a.d_head, config["seed"])
            run_metrics.append({"metric": "circuits.composition_baseline", "value": sum(baseline.values()) / 3,
                                "detail": baseline})
        return FamilyResult({"head_metrics": rows, "run_metrics": run_metrics}, tokens=0, extra_config={
            "positional": "absolute (learned position embeddings)" if positions is not None else
            "not defined: rotary position embeddings, no absolute positional embedding to read"})


class CompositionStats:
    """Streams the layers: each layer's readers meet the stored writers of every earlier layer, then its own
    writer is kept (only writers stay: (layers, heads, d_head, d_model) floats, a quarter of all factors)."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.writers: list[torch.Tensor] = []
        self.rows: list[dict[str, Any]] = []
        self.out_max = {kind: torch.zeros(n_layers, n_heads) for kind in KINDS}
        self.n_layers, self.n_heads = n_layers, n_heads

    def add(self, layer: int, factors: CompositionFactors) -> None:
        h = self.n_heads
        if self.writers:
            for kind in KINDS:
                scores = torch.cat([composition(writer, factors.readers[kind])
                                    for writer in self.writers])  # (layer * H, H): earlier writers x readers
                best, where = scores.max(0)
                per_writer = scores.max(1).values.reshape(layer, h)
                self.out_max[kind][:layer] = torch.maximum(self.out_max[kind][:layer], per_writer)
                for head in range(h):
                    partner = int(where[head])
                    for metric, value in ((f"{kind}_comp_max", best[head]),
                                          (f"{kind}_comp_mean", scores[:, head].mean()),
                                          (f"{kind}_comp_partner_layer", partner // h),
                                          (f"{kind}_comp_partner_head", partner % h)):
                        self.rows.append({"layer": layer, "head": head, "metric": f"circuits.{metric}",
                                          "value": float(value), "n": scores.shape[0], "stderr": None})
        self.writers.append(factors.writer)

    def metric_rows(self) -> list[dict[str, Any]]:
        """Reader rows (layers >= 1) and writer rows (every layer but the last, which writes to no later head)."""
        rows = list(self.rows)
        for kind in KINDS:
            rows += [r for r in head_metric_rows(f"circuits.{kind}_comp_out_max", self.out_max[kind], None, 0)
                     if r["layer"] < self.n_layers - 1]
        return rows
