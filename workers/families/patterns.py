"""Attention-pattern role scores on seeded BOS + X + X probes (X uniform random, |X| = n).

Scores, per head, each a mean over the probe sequences (stderr over sequences):

- stripe scores (Olsson et al. 2022; ARENA 1.2), in [0, 1], higher = more of the role:
  `prev_token` mean A[t, t-1] over t >= 1; `duplicate_token` mean A[t, t-n] and `induction`
  mean A[t, t-n+1] over the repeated half only (ARENA's diagonal also averages 2 spurious
  first-half entries; we leave them out).
- TransformerLens `head_detector` "mul" scores (`*_tl`): sum(A * D) / sum(A) over the whole
  pattern with exclude_bos = exclude_current_token = False. Rows with no target still count, so
  a perfect induction head scores about n / (2n + 1) ~ 0.5, not 1.
- `bos_sink`: Gu et al. (arXiv 2410.10781) alpha_0 = mean over t of A[t, 0]; > 0.3 is a sink.
- `entropy` (nats, 0 = one-hot), `self_attention` mean A[t, t], `mean_distance` mean of
  sum_s A[t, s] (t - s) in tokens, all over t >= 1 (row 0 can only attend to itself).

Failure cases: random tokens show only content-free behaviour (a "fuzzy" duplicate head on real
text may score low here); heads that attend to BOS by default look like sinks, not roles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from workers.adapters import BoundAdapter
from workers.batching import patterns_batch
from workers.families.base import FamilyResult, head_metric_rows, scaled_batch
from workers.hooks import eager_attention, weights_per_layer
from workers.models import LoadedModel
from workers.options import SEED, Option, resolve
from workers.probes import bos_id, repeated_tokens

METRICS = ("prev_token", "duplicate_token", "induction", "prev_token_tl", "duplicate_token_tl",
           "induction_tl", "bos_sink", "entropy", "self_attention", "mean_distance")


def detector_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens target patterns D, each (batch, T, T) float, lower-triangular."""
    b, t = tokens.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    prev = torch.zeros(t, t, dtype=torch.bool)
    prev[torch.arange(1, t), torch.arange(t - 1)] = True
    dup = (tokens[:, :, None] == tokens[:, None, :]) & causal.tril(-1)  # s < t, x_s == x_t
    ind = torch.zeros_like(dup)
    ind[:, :, 1:] = dup[:, :, :-1]  # D_ind[t, s] = D_dup[t, s - 1]; column 0 stays zero
    ind &= causal
    return {"prev_token_tl": prev.expand(b, t, t).float(), "duplicate_token_tl": dup.float(),
            "induction_tl": ind.float()}


def pattern_scores(attn: torch.Tensor, tokens: torch.Tensor, n: int,
                   targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence scores for one layer. attn: (batch, heads, T, T); returns {metric: (batch, heads)}."""
    attn = attn.float()
    t, device = attn.shape[-1], attn.device
    rows = torch.arange(1, t, device=device)
    second = torch.arange(n + 1, 2 * n + 1, device=device)  # positions of the repeated half
    scores = {
        "prev_token": attn[..., rows, rows - 1].mean(-1),
        "duplicate_token": attn[..., second, second - n].mean(-1),
        "induction": attn[..., second, second - n + 1].mean(-1),
        "bos_sink": attn[..., :, 0].mean(-1),
        "self_attention": attn[..., rows, rows].mean(-1),
    }
    body = attn[..., 1:, :]  # rows t >= 1
    scores["entropy"] = -(body * body.clamp_min(1e-12).log()).sum(-1).mean(-1)
    positions = torch.arange(t, device=device)
    distance = (positions[:, None] - positions[None, :]).clamp_min(0).float()[1:]
    scores["mean_distance"] = (body * distance).sum(-1).mean(-1)
    for name, target in targets.items():
        scores[name] = (attn * target.to(device)[:, None]).sum((-1, -2)) / attn.sum((-1, -2))
    return scores


class PatternsFamily:
    name = "patterns"
    version = 1
    stores = ("head_metrics",)

    options = (
        Option("probe_n", "int", 50, "|X|, the length of the repeated random block (BOS + X + X)", min=2, max=4096),
        Option("probe_batch", "int", 10, "repeated-token sequences in the probe set", min=1,
               max=1 << 20),
        SEED,
    )

    # how the metrics are defined: stored with every run (runs.config.definitions), not hashed into its id
    definitions: ClassVar[dict[str, str]] = {
        "sampler": "uniform over non-special token ids",
        "bos": "prepend tokenizer BOS (else EOS)",
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        o = resolve(self.options, options)
        return {"n": o["probe_n"], "batch": o["probe_batch"],
                "seed": o["seed"], "attn_implementation": "eager"}

    def probe_set(self, config: dict[str, Any]) -> str:
        return f"repeated-random:n={config['n']}:batch={config['batch']}:seed={config['seed']}"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        n, batch = config["n"], config["batch"]
        n_vocab = lm.adapter.unembed.weight.shape[0]
        tokens = repeated_tokens(lm.tokenizer, n_vocab, n=n, batch=batch, seed=config["seed"])
        targets = detector_patterns(tokens)
        # sequences per forward: what fits the free memory (workers/batching.py), halved on a retry
        step = scaled_batch(config, patterns_batch(lm.model, lm.device, lm.dtype, tokens.shape[1], batch))
        chunks = []  # per minibatch: per layer {metric: (minibatch, heads)}
        with eager_attention(lm.model):
            for start in range(0, batch, step):
                part = tokens[start:start + step]
                with torch.inference_mode(), scored_per_layer(lm.adapter, part, n, {
                        k: v[start:start + step] for k, v in targets.items()}) as per_layer:
                    lm.model(part.to(lm.device), logits_to_keep=1, use_cache=False)
                chunks.append([per_layer[layer] for layer in range(lm.adapter.n_layers)])
        rows = []
        for metric in METRICS:
            stacked = torch.cat([torch.stack([layer[metric] for layer in chunk]) for chunk in chunks],
                                dim=1)  # (layers, batch, heads)
            mean = stacked.mean(1)
            stderr = stacked.std(1) / batch**0.5 if batch > 1 else None
            rows += head_metric_rows(f"patterns.{metric}", mean, stderr, batch)
        return FamilyResult({"head_metrics": rows}, tokens=tokens.numel(),
                            extra_config={"bos_token_id": bos_id(lm.tokenizer)})


@contextmanager
def scored_per_layer(adapter: BoundAdapter, tokens: torch.Tensor, n: int,
                     targets: dict[str, torch.Tensor]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Score each layer's attention weights inside the layer and drop them (hooks.weights_per_layer):
    {layer: {metric: (b, heads)}}."""
    scores: dict[int, dict[str, torch.Tensor]] = {}
    on_device: dict[str, dict[str, torch.Tensor]] = {}  # the targets, moved once per device (device_map)

    def reduce(layer: int, weights: torch.Tensor) -> None:
        moved = on_device.setdefault(str(weights.device), {k: v.to(weights.device) for k, v in targets.items()})
        layer_scores = pattern_scores(weights, tokens, n, moved)
        scores[layer] = {k: v.cpu() for k, v in layer_scores.items()}

    with weights_per_layer(adapter, reduce):
        yield scores
