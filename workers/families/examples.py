"""Example contexts per head (HeadVis parity): the corpus contexts where each head acts most.

The corpus is cut into fixed-length windows (BOS + tokens, as the lens family reads it) and streamed
through the model with eager attention. Per head, per criterion, a streaming top-k keeps the `top_k`
windows with the highest score; each window offers one candidate per head: its best query position.
Query positions below `min_position` are not candidates (position 0 is BOS; very early rows have few
keys, so their largest weight is large by construction).

Criteria (scores per (window, head), higher = more of it):

- `max_attention`: max over query positions q >= min_position and keys 1 <= k <= q of A[q, k], the
  largest attention weight to any key but the first (BOS). In [0, 1]. This is HeadVis's
  `max_activation` (Luger, Kamath et al. 2026; Neuronpedia's headvis pipeline skips position 0 in
  row and column alike).
- `max_write`: max over q of ||z_q^h W_O^h||_2, the norm of what the head writes into the residual
  stream at q (with Gemma 2/3's post-attention norm gain and per-token 1/rms, as `BoundAdapter.
  write_input` gives it): a direct-effect proxy that needs no unembedding. Unbounded, in residual
  units. Computed in head space as z G z^T with G = W_O^h W_O^h^T (d_head x d_head), so no d_model-wide
  per-position tensor exists.

Stored per kept example (head_examples): the criterion, rank (1 = best), score, the tokens of the
window from `context` tokens before the query through `after` tokens after it (fewer at the window's
edges), their ids, the query's index in that list, and the head's attention row over the listed tokens
(rounded to `decimals`; 0 after the query, which is causal; the mass outside the listed tokens is
1 - sum). `source_window` / `source_pos` say where in the corpus windows the query sat.

Bounded: the worker holds, per head and criterion, k scores and k rows of `context` floats; nothing else
survives a layer (each layer's attention weights are reduced inside the layer and dropped). Stored
rows per head: 2 k, each about (context + after) tokens long.

Failure cases: max_attention favours early query positions (fewer keys, peakier rows) and heads that
attend sharply to a repeated delimiter; max_write favours positions with large value vectors (e.g.
the first tokens after BOS, rare tokens), which need not matter downstream; one candidate per window
means a head active everywhere in one window shows that window once; with few windows the examples
are the best of a small sample, not of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from atlas.errors import BadInput
from workers.adapters import BoundAdapter
from workers.batching import patterns_batch
from workers.corpora import WINDOWS_DEFINITION, load_corpus, token_windows
from workers.families.base import FamilyResult, scaled_batch
from workers.families.lens import check_corpus
from workers.hooks import capture_z, eager_attention, weights_per_layer
from workers.models import LoadedModel
from workers.options import CORPUS, TEXT_FIELD, Option, resolve
from workers.probes import bos_id

CRITERIA = ("max_attention", "max_write")
DEFAULTS = {"window": 64, "windows": 16, "batch": 8, "top_k": 5, "context": 24, "after": 3, "min_position": 4}
DECIMALS = 3


@dataclass
class TopK:
    """One layer's best-k candidates per head for one criterion, sorted by score (ties: earlier window).

    scores (H, k) float32, -inf = empty slot; windows, positions (H, k) long, -1 = empty; rows (H, k, C)
    float32: the attention row over keys q-C+1 .. q (NaN before key 0), so rows[..., -1] is the query's."""

    scores: torch.Tensor
    windows: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def empty(cls, n_heads: int, k: int, context: int) -> TopK:
        return cls(torch.full((n_heads, k), float("-inf")), torch.full((n_heads, k), -1, dtype=torch.long),
                   torch.full((n_heads, k), -1, dtype=torch.long), torch.full((n_heads, k, context), float("nan")))

    def merge(self, scores: torch.Tensor, windows: torch.Tensor, positions: torch.Tensor,
              rows: torch.Tensor) -> None:
        """Add a batch's candidates: scores, positions (H, B), windows (B,), rows (H, B, C), all on the CPU.

        The kept entries come first and the batch's in window order, and the sort is stable, so equal
        scores keep the earliest window, however the corpus was batched."""
        k = self.scores.shape[1]
        all_scores = torch.cat([self.scores, scores], dim=1)
        order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :k]  # (H, k)
        self.scores = all_scores.gather(1, order)
        self.windows = torch.cat([self.windows, windows.expand(scores.shape[0], -1)], 1).gather(1, order)
        self.positions = torch.cat([self.positions, positions], 1).gather(1, order)
        all_rows = torch.cat([self.rows, rows], dim=1)
        self.rows = all_rows.gather(1, order[..., None].expand(-1, -1, all_rows.shape[-1]))


def query_rows(weights: torch.Tensor, queries: torch.Tensor, context: int) -> torch.Tensor:
    """Each (sequence, head)'s attention row at its query, over keys q-context+1 .. q (NaN before key 0).

    weights (B, H, T, T); queries (B, H) long -> (B, H, context) float32."""
    b, h, t, _ = weights.shape
    full = weights.gather(2, queries[:, :, None, None].expand(b, h, 1, t)).squeeze(2).float()  # (B, H, T)
    keys = queries[..., None] - (context - 1) + torch.arange(context, device=weights.device)  # (B, H, C)
    picked = full.gather(2, keys.clamp_min(0))
    return picked.masked_fill(keys < 0, float("nan"))


def attention_scores(weights: torch.Tensor, min_position: int) -> torch.Tensor:
    """max over keys k >= 1 of A[q, k], per query q >= min_position; (B, H, T, T) -> (B, H, T - min_position)."""
    return weights[:, :, min_position:, 1:].float().amax(-1)


def write_norms(adapter: BoundAdapter, layer: int, z: torch.Tensor, gram: torch.Tensor,
                min_position: int) -> torch.Tensor:
    """||z_q^h W_write^h|| per query q >= min_position.

    z (B, T, H, dh), gram (H, dh, dh) -> (B, H, T - min_position)."""
    zs = adapter.write_input(layer, z).float()[:, min_position:]  # (B, P, H, dh)
    b, p, h, dh = zs.shape
    per_head = zs.permute(2, 0, 1, 3).reshape(h, b * p, dh)  # (H, B*P, dh)
    squared = (torch.bmm(per_head, gram.to(zs.device)) * per_head).sum(-1)  # (H, B*P)
    return squared.clamp_min(0).sqrt().view(h, b, p).transpose(0, 1)


class ExampleStats:
    """Streaming per-head top-k over the corpus windows, one TopK per (criterion, layer)."""

    def __init__(self, adapter: BoundAdapter, top_k: int, context: int, min_position: int) -> None:
        self.adapter = adapter
        self.context, self.min_position = context, min_position
        self.kept = {c: [TopK.empty(adapter.n_heads, top_k, context) for _ in range(adapter.n_layers)]
                     for c in CRITERIA}
        w = [adapter.w_write(layer) for layer in range(adapter.n_layers)]  # (H, dh, d_model) each
        self.grams = [m @ m.transpose(1, 2) for m in w]  # (H, dh, dh): ||z W||^2 = z G z^T

    def layer(self, layer: int, weights: torch.Tensor, z: torch.Tensor, first_window: int) -> None:
        """Reduce one layer of one batch: weights (B, H, T, T), z (B, T, H, dh), windows first_window...."""
        if weights.shape[-1] <= self.min_position:
            raise BadInput(f"windows of {weights.shape[-1]} tokens have no query at or past position "
                           f"{self.min_position}", "pass a longer examples_window or a smaller examples_min_position")
        windows = torch.arange(first_window, first_window + weights.shape[0])
        per_query = {"max_attention": attention_scores(weights, self.min_position),
                     "max_write": write_norms(self.adapter, layer, z, self.grams[layer], self.min_position)}
        for criterion, scores in per_query.items():
            best, at = scores.max(-1)  # (B, H): the window's best query per head
            queries = at + self.min_position
            rows = query_rows(weights, queries, self.context)
            self.kept[criterion][layer].merge(best.T.cpu(), windows, queries.T.cpu(), rows.transpose(0, 1).cpu())

    def example_rows(self, tokens: torch.Tensor, tokenizer: Any, after: int) -> list[dict[str, Any]]:
        """head_examples rows: every kept (criterion, layer, head, rank) with its tokens and attention row."""
        texts: dict[int, str] = {}

        def text(token_id: int) -> str:
            if token_id not in texts:
                texts[token_id] = tokenizer.decode([token_id])
            return texts[token_id]

        length = tokens.shape[1]
        out = []
        for criterion, layers in self.kept.items():
            for layer, kept in enumerate(layers):
                for head in range(kept.scores.shape[0]):
                    rank = 0
                    for slot in range(kept.scores.shape[1]):
                        window, q = int(kept.windows[head, slot]), int(kept.positions[head, slot])
                        if window < 0:
                            continue  # fewer windows than top_k
                        rank += 1
                        start, stop = max(0, q - self.context + 1), min(length, q + after + 1)
                        ids = tokens[window, start:stop].tolist()
                        row = kept.rows[head, slot, self.context - (q - start + 1):].tolist()
                        attention = [round(v, DECIMALS) for v in row] + [0.0] * (stop - q - 1)
                        out.append({"layer": layer, "head": head, "criterion": criterion, "rank": rank,
                                    "score": float(kept.scores[head, slot]), "tokens": [text(i) for i in ids],
                                    "token_ids": ids, "query_pos": q - start, "attention": attention,
                                    "source_window": window, "source_pos": q})
        return out


@contextmanager
def reduced_per_layer(adapter: BoundAdapter, stats: ExampleStats, first_window: int) -> Iterator[None]:
    """Reduce each layer's weights and z inside the layer (hooks.weights_per_layer), then drop them."""
    with capture_z(adapter) as zs, weights_per_layer(
            adapter, lambda layer, weights: stats.layer(layer, weights, zs.pop(layer), first_window)):
        yield


class ExamplesFamily:
    name = "examples"
    version = 1
    stores = ("head_examples",)

    options = (
        Option("examples_window", "int", DEFAULTS["window"], "tokens per corpus window (BOS included)",
               min=2, max=8192),
        Option("examples_windows", "int", DEFAULTS["windows"], "corpus windows read", min=1, max=10_000_000),
        Option("examples_batch", "int", DEFAULTS["batch"], "windows per forward at most (fewer if memory is short)",
               min=1, max=4096),
        Option("examples_top_k", "int", DEFAULTS["top_k"], "examples kept per head and criterion", min=1, max=100),
        Option("examples_context", "int", DEFAULTS["context"], "tokens stored up to and including the query",
               min=1, max=1024),
        Option("examples_after", "int", DEFAULTS["after"], "tokens stored after the query", min=0, max=256),
        Option("examples_min_position", "int", DEFAULTS["min_position"],
               "first query position that can be an example (0 is BOS)", min=1, max=8191),
        CORPUS, TEXT_FIELD,
    )

    # how the criteria are defined: stored with every run (runs.config.definitions), not hashed into its id
    definitions: ClassVar[dict[str, str]] = {
        "max_attention": "max over q >= min_position, 1 <= k <= q of A[q, k] (HeadVis max_activation)",
        "max_write": "max over q >= min_position of ||z_q W_O^h|| (post-attention norm folded, Gemma 2/3)",
        "candidates": "one per window and head: the window's best query position; top_k windows kept",
        "stored": "tokens q-context+1 .. q+after, their ids, the query's index, A[q, .] over them (0 after q)",
        "bos": WINDOWS_DEFINITION,
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        o = resolve(self.options, options)
        window = o["examples_window"]
        if o["examples_min_position"] >= window:
            raise BadInput(f"examples_min_position {o['examples_min_position']} leaves no query in windows of "
                           f"{window} tokens", "pass a smaller examples_min_position or a longer examples_window")
        spec, corpus_id = check_corpus(o, window)
        return {"corpus": spec, "corpus_id": corpus_id, "text_field": o["text_field"], "window": window,
                "windows": o["examples_windows"], "batch": o["examples_batch"], "top_k": o["examples_top_k"],
                "context": o["examples_context"], "after": o["examples_after"],
                "min_position": o["examples_min_position"], "decimals": DECIMALS, "attn_implementation": "eager"}

    def probe_set(self, config: dict[str, Any]) -> str:
        return f"corpus:{config['corpus_id']}:window={config['window']}:windows={config['windows']}"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        corpus = load_corpus(config["corpus"], config["text_field"])
        if corpus.corpus_id != config["corpus_id"]:
            raise BadInput(f"the corpus {config['corpus']} changed since the build was planned",
                           "run the build again")
        tokens = token_windows(corpus, lm.tokenizer, config["window"], config["windows"], bos=bos_id(lm.tokenizer))
        stats = ExampleStats(lm.adapter, config["top_k"], config["context"], config["min_position"])
        step = scaled_batch(config, patterns_batch(lm.model, lm.device, lm.dtype, tokens.shape[1], config["batch"]))
        with eager_attention(lm.model):
            for start in range(0, tokens.shape[0], step):
                with torch.inference_mode(), reduced_per_layer(lm.adapter, stats, start):
                    lm.model(tokens[start:start + step].to(lm.device), logits_to_keep=1, use_cache=False)
        rows = stats.example_rows(tokens, lm.tokenizer, config["after"])
        return FamilyResult({"head_examples": rows}, tokens=tokens.numel(),
                            extra_config={"n_windows": int(tokens.shape[0]), "corpus_provenance": corpus.provenance})
